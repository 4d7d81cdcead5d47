"""Peak extra memory of a block of work, for benchmarks and demos.

CUDA: the caching allocator's peak above what was allocated on entry. CPU: the process's peak
resident set (VmHWM) above the resident set on entry, after resetting the peak through
``/proc/self/clear_refs`` (Linux; elsewhere the value is nan).
"""

import torch


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.extra_mb``."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.extra_mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            rss = _status_kb("VmRSS")
            self._base = None if rss is None else rss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _status_kb("VmHWM")
            peak = None if hwm is None else hwm * 1024
        if peak is not None and self._base is not None:
            self.extra_mb = max(0, peak - self._base) / 2**20
        return False
