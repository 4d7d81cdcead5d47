"""Whether a relaunch may resume a checkpoint: its config against the checkpoint's.

A relaunch resumes from the newest checkpoint of its run folder (``checkpoint.resume: auto``).
If its config differs from the one the checkpoint was written with in anything that changes
the run — the schedule, the optimizer, the data, the batch, the model — the resume would
silently train another run than either config describes (a shorter ``schedule.steps`` used to
end at once with no final model; a longer one re-derived the decay). So the differences stop
the launch with one line naming them, unless ``checkpoint.accept_changes`` lists them. Keys a
recipe marks as fixed (the model and the data, whose weights and position the checkpoint
holds) cannot be accepted: such a change is a new run.

Not compared: the keys of one launch (where and how often to checkpoint and log, when to stop,
``run.output_dir``) and keys the checkpoint's version of the config did not have.
"""

from __future__ import annotations

# Keys (or whole sections) that describe a launch rather than the run: they may differ freely.
LAUNCH_KEYS = (
    "run.output_dir", "run.stop_at_step", "run.validate_batches", "run.save_final_model",
    "run.compile", "run.cpu_threads", "checkpoint", "logging", "distributed.timeout_minutes",
    "distributed.bucket_cap_mb", "distributed.find_unused_parameters", "distributed.backend",
)


def covers(prefixes, key: str) -> bool:
    """Whether ``key`` is one of ``prefixes`` or lies in a section one of them names."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved: dict, config, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, saved value, new value)`` for every field of the dataclass ``config``
    whose value differs from the checkpoint's ``saved`` dict (sections recursed into, other
    values — a dict of ratios among them — compared whole); a field the saved config lacks is
    skipped (a config of another version of the code)."""
    import dataclasses

    from unigen.configuration import plain_data

    out = []
    for f in dataclasses.fields(config):
        if not f.init or f.name not in saved:
            continue
        key, old, new = f"{prefix}{f.name}", saved[f.name], getattr(config, f.name)
        if dataclasses.is_dataclass(new) and isinstance(old, dict):
            out.extend(config_changes(old, new, key + "."))
        elif plain_data(old) != plain_data(new):  # a checkpoint's tuples come back as lists
            out.append((key, old, new))
    return out


def _short(v, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_resume_config(saved: dict, config, *, checkpoint: str, accepted=(),
                        fixed=(), new_run_hint: str = "") -> list[tuple[str, object, object]]:
    """Raise ``ValueError`` (one line) when ``config`` (this launch's dataclass) differs from
    the checkpoint's ``saved`` config (a plain dict) in a key that changes the run and is not
    ``accepted``, or in a ``fixed`` one; return the accepted differences (for the launch to
    report)."""
    changes = [c for c in config_changes(saved, config) if not covers(LAUNCH_KEYS, c[0])]
    pinned = [c for c in changes if covers(fixed, c[0])]
    refused = [c for c in changes if not covers(fixed, c[0]) and not covers(accepted, c[0])]

    def listed(items):
        return ", ".join(f"{k} {_short(a)} → {_short(b)}" for k, a, b in items)

    if pinned:
        raise ValueError(
            f"{checkpoint} was written with another config: {listed(pinned)} cannot change "
            f"when resuming (the checkpoint's weights and data position belong to it); relaunch "
            f"with the checkpoint's values, or start a new run in another run.output_dir"
            + (f" ({new_run_hint})" if new_run_hint else ""))
    if refused:
        keys = ",".join(k for k, _, _ in refused)
        raise ValueError(
            f"{checkpoint} was written with another config: {listed(refused)}; relaunch with "
            f"the checkpoint's values to resume it, pass --checkpoint.accept_changes={keys} to "
            f"resume with the new ones, or start a new run in another run.output_dir")
    return changes
