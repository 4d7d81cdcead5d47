"""Contrastive InfoNCE + hard-negative mining, forward + backward: ours vs the public alternatives.

The workload of UniGen's L_CL + [match] negatives: B image/text [CLS] pairs, D = 256, bf16
features, a learnable logit scale; one step = symmetric loss, gradients for both feature sets and
the scale, and one hard negative per image and per text drawn ∝ softmax(similarity) with the
positive excluded.

Providers (each skips cleanly when it cannot run here):

- ``ours``: ``contrastive_loss(backend="triton", negatives="sample")``;
- ``ours_torch``: the same op on its dense PyTorch path (``backend="torch"``);
- ``lavis``: the ALBEF / BLIP / LAVIS recipe: dense logits, cross-entropy both ways, then
  ``weights_i2t = softmax(sim_i2t)`` / ``weights_t2i`` with the diagonal zeroed and one
  ``torch.multinomial(weights[b], 1).item()`` per row in a Python loop (two host syncs per sample);
- ``torch_vectorised``: the same maths without the loop: masked softmax + one batched
  ``torch.multinomial`` per direction;
- ``torch_compiled``: ``torch.compile`` of ``torch_vectorised`` (compiled outside the timed rounds);
- ``open_clip``: open_clip's ``ClipLoss`` (loss only, no mining: a lower bound), when installed;
- ``inf_cl``: Inf-CL's ``cal_inf_loss`` both ways (loss only, no mining), when installed (GPU).

Sizes: B ∈ {512, 4096} for time, and B = 65536 (``memory`` case) for peak memory, where only the
O(B·D) providers are run (the dense ones need ~16 GiB per B×B fp32 matrix). GPU target (same run,
same device): at B = 4096, ours ≥ 10× faster than ``lavis`` and ≥ 2× faster than the best
vectorised PyTorch provider. On CPU only a tiny case runs (seconds) to keep this file importable and
exercised; its timings mean nothing.

Each benchmark records the device, versions and the peak memory of one step in ``extra_info``; on
CUDA a summary with the ratios is written to ``$OUT`` (when set) or ``benchmarks/results/local/`` as
``contrastive.json`` and ``contrastive.md``.
"""

import importlib.util
import json
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import (
    NEEDS_CUDA,
    bench_device,
    device_name,
    missing,
    optional,
    results_dir,
    triton_unavailable,
)
from unigen.kernels import contrastive_loss
from unigen.kernels.common.backend import triton_available
from unigen.memory import PeakMemory

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if CUDA:
    SIZES = {"B512": 512, "B4096": 4096, "memory": 65536}
    HEADLINE = "B4096"
    DIM, DTYPE = 256, torch.bfloat16
    ROUNDS, WARMUP = 10, 2
else:
    SIZES = {"B512": 48}
    HEADLINE = "B512"
    DIM, DTYPE = 32, torch.float32
    ROUNDS, WARMUP = 1, 0
SIZE_PARAMS = [pytest.param(s, marks=[pytest.mark.headline] if s == HEADLINE else []) for s in SIZES]

PROVIDERS = ["ours", "ours_torch", "lavis", "torch_vectorised", "torch_compiled", "open_clip", "inf_cl"]
# Providers whose memory is O(B·D): the only ones attempted at B = 65536.
LINEAR_MEMORY = {"ours", "inf_cl"}
# The per-row .item() loop at B = 4096 takes a good fraction of a second per step: fewer rounds.
SLOW_ROUNDS = {"lavis": 2}
# torch.compile costs tens of seconds per shape: compiled once, at the size the target names.
COMPILED_SIZES = {"B4096"}

_RESULTS = {}


def _device_name():
    return device_name(bench_device())


def _version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def _workload(n):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(n, DIM, generator=g).to(DEVICE, DTYPE).requires_grad_()
    txt = torch.randn(n, DIM, generator=g).to(DEVICE, DTYPE).requires_grad_()
    log_scale = torch.tensor(2.659, device=DEVICE, requires_grad=True)  # log(1/0.07)
    return img, txt, log_scale


def _dense_loss(img, txt, log_scale):
    scale = log_scale.exp()
    a, b = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    sim_i2t = scale * a @ b.t()
    sim_t2i = sim_i2t.t()
    labels = torch.arange(img.shape[0], device=img.device)
    loss = 0.5 * (F.cross_entropy(sim_i2t, labels) + F.cross_entropy(sim_t2i, labels))
    return loss, sim_i2t.detach(), sim_t2i.detach()


def _lavis_step(img, txt, log_scale):
    """ALBEF's ``forward`` (models/model_pretrain.py) / LAVIS' ``blip_pretrain``: per-row sampling."""
    loss, sim_i2t, sim_t2i = _dense_loss(img, txt, log_scale)
    bs = img.shape[0]
    with torch.no_grad():
        weights_i2t = F.softmax(sim_i2t.float(), dim=1)
        weights_i2t.fill_diagonal_(0)
        weights_t2i = F.softmax(sim_t2i.float(), dim=1)
        weights_t2i.fill_diagonal_(0)
    neg_text = []
    for b in range(bs):
        neg_text.append(torch.multinomial(weights_i2t[b], 1).item())
    neg_image = []
    for b in range(bs):
        neg_image.append(torch.multinomial(weights_t2i[b], 1).item())
    grads = torch.autograd.grad(loss, (img, txt, log_scale))
    return grads, neg_text, neg_image


def _vectorised_step(img, txt, log_scale):
    loss, sim_i2t, sim_t2i = _dense_loss(img, txt, log_scale)
    eye = torch.eye(img.shape[0], dtype=torch.bool, device=img.device)
    with torch.no_grad():
        w_i2t = torch.softmax(sim_i2t.float().masked_fill(eye, float("-inf")), 1)
        w_t2i = torch.softmax(sim_t2i.float().masked_fill(eye, float("-inf")), 1)
        neg_text = torch.multinomial(w_i2t, 1).view(-1)
        neg_image = torch.multinomial(w_t2i, 1).view(-1)
    grads = torch.autograd.grad(loss, (img, txt, log_scale))
    return grads, neg_text, neg_image


def unavailable(provider: str) -> str | None:
    """Why ``provider`` cannot run here (the skip reason), or None."""
    if provider == "ours":
        return triton_unavailable()
    if provider == "torch_compiled" and not CUDA:
        # inductor's compile time on 2 CPU cores is not worth it for a smoke case
        return f"{NEEDS_CUDA} (compiled on GPUs only)"
    if provider == "open_clip":
        return missing("open_clip")
    if provider == "inf_cl":
        return NEEDS_CUDA if not CUDA else missing("inf_cl")
    return None


def _step(provider, n):
    """A closure running one step of ``provider`` (one :func:`unavailable` accepts) at
    batch n."""
    img, txt, log_scale = _workload(n)
    if provider in ("ours", "ours_torch"):
        backend = "triton" if provider == "ours" else "torch"
        gen = torch.Generator(device=DEVICE).manual_seed(0)

        def run():
            out = contrastive_loss(img, txt, log_scale.exp(), generator=gen, backend=backend)
            grads = torch.autograd.grad(out.loss, (img, txt, log_scale))
            return grads, out.neg_text_for_image, out.neg_image_for_text

        return run
    if provider == "lavis":
        return lambda: _lavis_step(img, txt, log_scale)
    if provider == "torch_vectorised":
        return lambda: _vectorised_step(img, txt, log_scale)
    if provider == "torch_compiled":
        compiled = torch.compile(_vectorised_step, dynamic=False)
        return lambda: compiled(img, txt, log_scale)
    if provider == "open_clip":
        # absent, or present without its own dependencies (torchvision, ftfy, timm): a skip
        clip_loss = optional("open_clip", "open_clip.loss", "ClipLoss")()

        def run():
            a, b = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
            loss = clip_loss(a, b, log_scale.exp())
            return torch.autograd.grad(loss, (img, txt, log_scale))

        return run
    if provider == "inf_cl":
        cal_inf_loss = optional("inf_cl", "inf_cl", "cal_inf_loss")

        def run():
            a, b = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
            scale = log_scale.exp()
            # The scale multiplies the queries here rather than through cal_inf_loss(scale=...),
            # whose backward all-reduces its gradient and so needs an initialised process group.
            loss = 0.5 * (cal_inf_loss(scale * a, b, head_dim=min(DIM, 256))
                          + cal_inf_loss(scale * b, a, head_dim=min(DIM, 256)))
            return torch.autograd.grad(loss, (img, txt, log_scale))

        return run
    raise ValueError(provider)


def _synced(fn):
    def run():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    return run


def _triton_version():
    return _version("triton")


@pytest.mark.parametrize("size", SIZE_PARAMS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_contrastive_fwd_bwd_mining(benchmark, provider, size):
    n = SIZES[size]
    if size == "memory" and provider not in LINEAR_MEMORY:
        pytest.skip(f"{provider} holds B×B matrices: not run at B = {n}")
    if provider == "torch_compiled" and size not in COMPILED_SIZES:
        pytest.skip(f"torch_compiled is only measured at {sorted(COMPILED_SIZES)}")
    reason = unavailable(provider)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    run = _synced(_step(provider, n))
    rounds = 2 if size == "memory" else SLOW_ROUNDS.get(provider, ROUNDS)
    try:
        peak_mb = _measure(benchmark, run, "contrastive_loss", rounds, size=size, batch=n,
                           mining=provider not in ("open_clip", "inf_cl"))
    except torch.OutOfMemoryError:
        _RESULTS[(provider, size)] = dict(median_ms=None, peak_mem_mib="OOM")
        pytest.skip(f"{provider} ran out of memory at B = {n}")
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else _time_once(run)
    _RESULTS[(provider, size)] = dict(median_ms=median * 1e3, peak_mem_mib=peak_mb)


def _measure(benchmark, run, group, rounds, **info):
    """One step to compile / autotune outside the timed rounds, one for the peak memory, then the
    timed rounds; records the device, versions and peak memory. Returns the peak (MB)."""
    run()
    with PeakMemory(bench_device()) as mem:
        run()
    benchmark.group = group
    benchmark.extra_info.update(
        dim=DIM, dtype=str(DTYPE).replace("torch.", ""), device=_device_name(),
        torch=torch.__version__, triton=_triton_version(), peak_mem_mb=mem.extra_mb, **info)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=min(WARMUP, rounds - 1), iterations=1)
    return mem.extra_mb


def _time_once(run):
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _ratios():
    """Speed-up of ours over every other provider measured in this run (>1 = ours faster)."""
    out = {}
    for size in SIZES:
        ours = _RESULTS.get(("ours", size))
        if not ours or ours["median_ms"] is None:
            continue
        for provider in PROVIDERS[1:]:
            other = _RESULTS.get((provider, size))
            if other and other["median_ms"] is not None:
                out[f"{size}: ours vs {provider}"] = other["median_ms"] / ours["median_ms"]
    return out


@pytest.fixture(scope="module", autouse=True)
def _write_summary():
    yield
    if not CUDA or not _RESULTS:
        return
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    summary = dict(
        device=_device_name(), torch=torch.__version__, triton=_triton_version(),
        open_clip=_version("open_clip"), inf_cl=_version("inf_cl"), dim=DIM, dtype=str(DTYPE),
        results={f"{p}/{s}": r for (p, s), r in sorted(_RESULTS.items())},
        speedups=_ratios(),
        targets={"B4096: ours vs lavis": 10.0, "B4096: ours vs best of torch_vectorised/torch_compiled": 2.0},
    )
    (folder / "contrastive.json").write_text(json.dumps(summary, indent=2))
    lines = [f"### Contrastive loss + hard-negative mining, fwd+bwd ({summary['device']}, "
             f"torch {torch.__version__})", "", f"D = {DIM}, {DTYPE}", "",
             "| provider | size | median ms | peak MiB |", "|---|---|---|---|"]
    for (p, s), r in sorted(_RESULTS.items(), key=lambda x: (x[0][1], x[0][0])):
        ms = "-" if r["median_ms"] is None else f"{r['median_ms']:.3f}"
        peak = r["peak_mem_mib"]
        peak = "-" if peak is None else (peak if isinstance(peak, str) else f"{peak:.0f}")
        lines.append(f"| {p} | {s} | {ms} | {peak} |")
    lines += ["", "| speed-up of ours | x |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in summary["speedups"].items()]
    (folder / "contrastive.md").write_text("\n".join(lines) + "\n")


# Tiles and parallelism of our kernels to sweep on a GPU at B = 4096 (the first is the default,
# 64 x 32 at 8 warps, reported as "ours"): (block_m, block_n, num_warps) of every sweep and the
# programs the splits aim at. In the sm_90 compile check 32 x 32 compiles to mma.sync, 64 x 64
# spills in the backward (4-64 bytes at 8 warps). The winner replaces the defaults of
# kernels/contrastive_loss/launch.py (_launch_config, _TARGET_PROGRAMS).
TILE_CONFIGS = {
    "ours": dict(tiles=None, target_programs=1024),
    "ours_m32n32w4": dict(tiles=(32, 32, 4), target_programs=1024),  # the former default (mma.sync)
    "ours_m32n64w8": dict(tiles=(32, 64, 8), target_programs=1024),
    "ours_m64n64w8": dict(tiles=(64, 64, 8), target_programs=1024),
    "ours_t512": dict(tiles=None, target_programs=512),
    "ours_t2048": dict(tiles=None, target_programs=2048),
}


@pytest.mark.parametrize("provider", TILE_CONFIGS)
def test_ours_tile_sweep(benchmark, provider, monkeypatch):
    if not (CUDA and triton_available()):
        pytest.skip(f"tile sweep: {NEEDS_CUDA} and triton")
    module = importlib.import_module("unigen.kernels.contrastive_loss.launch")
    cfg = TILE_CONFIGS[provider]
    monkeypatch.setattr(module, "_BLOCK_OVERRIDE", cfg["tiles"])
    monkeypatch.setattr(module, "_TARGET_PROGRAMS", cfg["target_programs"])
    _measure(benchmark, _synced(_step("ours", SIZES["B4096"])), "contrastive_loss_tile_sweep",
             ROUNDS, batch=SIZES["B4096"], tiles=str(cfg["tiles"]),
             target_programs=cfg["target_programs"])
