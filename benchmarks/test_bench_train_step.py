"""One UniGen training step: the fused configuration vs the naive one, same model, same batch.

A step is what the trainer runs per optimizer step with one micro-batch: the host-side layout of
the batch, forward (every task: trans, cap, qus from the batch, [match] built from the pairs,
L_CL), backward, gradient clipping and AdamW.

- On CUDA: the paper-size model (CLIP ViT-L/14 at 224 frozen and in bf16, the BLIP-2-size
  Q-Former, xlm-roberta-base, GPT-2 base with its middle 6 blocks frozen; random weights: the
  speed does not depend on them) under bf16 autocast, at the paper's per-GPU batch 512 / 8 = 64
  samples. Goal, on one H100: >= 1000 samples/s and >= 2x the naive configuration.
- On CPU: the tiny model (``UniGenConfig.tiny()``) at 16 samples — a smoke case that keeps this
  file exercised; its timings say nothing about a GPU.

Providers:

- ``ours``: the fused configuration (fused linear + cross-entropy, the fused contrastive op with
  on-device mining, packed prefix-LM attention with the "auto" backend), torch's fused AdamW;
- ``features``: ours trained from a feature store (``data.image_features``): the batch holds
  the frozen ViT's output (bf16, in pinned host memory as the loader hands it over, copied in
  the step) instead of pixels, so the ViT does not run; goal on one H100: >= 2x ours' samples/s;
- ``ours_apex``: the same as ours with NVIDIA apex's ``FusedAdam`` (AdamW mode) and
  ``FusedLayerNorm`` in place of torch's fused AdamW and ``nn.LayerNorm``, where apex is
  installed (it is not on PyPI and not on the GPU machine: see benchmarks/fetch_gpu_wheels.sh;
  the row skips);
- ``naive``: padded SDPA attention, ``F.cross_entropy`` on the full logits per task, the
  LAVIS-style PyTorch contrastive loss and mining.

Per provider: step time, samples/s, tokens/s (target and input tokens), the FLOPs per sample of
the step by :mod:`benchmarks.step_flops` (every matmul, part by part; the features provider's
without the ViT) and the share of them the ViT is, MFU (the trainable parameters' 6·N·tokens,
and separately with the frozen ViT's forward 2·N_vit·tokens_vit added, as the training log
estimates it; GPUs with a known peak only) and peak memory. The summary with the ratios to ours
measured in the same run, and the paper-size step's FLOPs by part (counted, whatever the
device), goes to ``train_step.json`` / ``train_step.md`` in ``$OUT`` (when set) or
``benchmarks/results/local/``.
"""

import json
import statistics
import time

import pytest
import torch

from benchmarks.conftest import bench_device, device_name, optional, results_dir, tiny_shapes
from benchmarks.step_flops import step_flops
from unigen.memory import PeakMemory
from unigen.model.batch import UniGenBatch
from unigen.model.config import UniGenConfig
from unigen.model.unigen_model import UniGen
from unigen.model.vit_features import encode
from unigen.training.config import OptimConfig
from unigen.training.distributed import clip_grad_norm
from unigen.training.metrics import peak_flops
from unigen.training.optim import build_optimizer, trainable_param_groups

CUDA = torch.cuda.is_available()
SAMPLES_GPU = 64  # the paper's 512 over 8 GPUs
if CUDA:
    SAMPLES, ROUNDS, WARMUP = SAMPLES_GPU, 5, 2
else:
    # more rounds than on a GPU: the 2-core machines are shared, the median needs them
    SAMPLES, ROUNDS, WARMUP = (8, 1, 0) if tiny_shapes() else (16, 9, 2)
PROVIDERS = ["ours", "features", "naive", "ours_apex"]
_RESULTS: dict[str, dict] = {}


def config_for(size: str) -> UniGenConfig:
    """The benchmark's model, "paper" or "tiny", with fixed [match] answer ids."""
    cfg = UniGenConfig.paper() if size == "paper" else UniGenConfig.tiny()
    cfg.tasks.match_yes_ids, cfg.tasks.match_no_ids, cfg.tasks.eos_token_id = (4,), (5,), 2
    cfg.__post_init__()
    return cfg


def _config() -> UniGenConfig:
    return config_for("paper" if CUDA else "tiny")


def batch_for(cfg: UniGenConfig, samples: int, seed: int = 0, images: bool = True) -> UniGenBatch:
    """``samples`` samples in the paper's task mix: a quarter each of trans, cap, qus and
    image-text pairs (each pair a [match] "yes", two mined "no" and an L_CL pair); CC3M-like
    lengths (texts up to text.max_length, targets of 8-24 tokens). ``images=False`` leaves the
    pixels out but keeps the layout (for counting)."""
    g = torch.Generator().manual_seed(seed)
    q = samples // 4
    n_img, n_txt = 3 * q, 3 * q  # cap + qus + pair images; trans + qus + pair texts
    L = cfg.text.max_length
    lens = torch.randint(max(4, L // 3), L + 1, (n_txt,), generator=g)
    text_ids = torch.randint(5, cfg.text.vocab_size, (n_txt, L), generator=g)
    text_mask = torch.arange(L)[None, :] < lens[:, None]
    task = torch.tensor([0] * q + [1] * q + [2] * q)
    image_index = torch.cat([torch.full((q,), -1), torch.arange(q), torch.arange(q, 2 * q)])
    text_index = torch.cat([torch.arange(q), torch.full((q,), -1), torch.arange(q, 2 * q)])
    tlens = torch.randint(8, 25, (3 * q,), generator=g)
    target_ids = torch.randint(5, cfg.decoder.vocab_size, (int(tlens.sum()),), generator=g)
    target_ids[torch.cumsum(tlens, 0) - 1] = cfg.tasks.eos_token_id
    cu = torch.zeros(3 * q + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(tlens, 0)
    size = cfg.vision.image_size
    pixels = torch.randn(n_img, 3, size, size, generator=g) if images else None
    return UniGenBatch(
        task=task, image_index=image_index, text_index=text_index, target_ids=target_ids,
        target_cu_seqlens=cu, images=pixels,
        text_ids=text_ids * text_mask, text_mask=text_mask,
        pair_image_index=torch.arange(2 * q, 3 * q), pair_text_index=torch.arange(2 * q, 3 * q),
        pair_ids=torch.arange(q))


def _apex(model, cfg: OptimConfig):
    """apex's fused LayerNorm in place of every affine ``nn.LayerNorm`` (same parameters), and
    its FusedAdam in AdamW mode over the same parameter groups as ``build_optimizer``."""
    normalization = optional("ours_apex", "apex.normalization")
    optimizers = optional("ours_apex", "apex.optimizers")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.LayerNorm and child.elementwise_affine:
                fused = normalization.FusedLayerNorm(child.normalized_shape, eps=child.eps)
                fused = fused.to(child.weight.device, child.weight.dtype)
                fused.load_state_dict(child.state_dict())
                for p, q in zip(fused.parameters(), child.parameters()):
                    p.requires_grad_(q.requires_grad)
                setattr(module, name, fused)
    return optimizers.FusedAdam(trainable_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                betas=cfg.betas, eps=cfg.eps, adam_w_mode=True)


def _setup(provider: str):
    if provider == "ours_apex":  # skip before building the model where apex is absent
        optional("ours_apex", "apex.optimizers")
    device = bench_device()
    torch.manual_seed(0)
    cfg = _config()
    with device:  # initialising ~800M parameters on the CPU would take most of the stage
        model = UniGen(cfg).train()
    if provider == "naive":
        model.configure_backends(cross_entropy="naive", contrastive="naive",
                                 attention="padded_sdpa")
    opt = _apex(model, OptimConfig()) if provider == "ours_apex" else build_optimizer(
        model, OptimConfig(), device)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = batch_for(cfg, SAMPLES)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    flops = step_flops(cfg, batch)
    if provider == "features":
        # what the store holds: the ViT's output under the run's autocast, in bf16
        with torch.no_grad(), amp:
            stored = encode(model.image_encoder.vit_features(batch.images.to(device)), "bf16")
        batch.images, batch.image_features = None, stored.values.cpu()
        flops["total"] -= flops["vit"]
    if device.type == "cuda":
        images = batch.images.to(device) if batch.images is not None else None
        batch = batch.pin_memory()  # the stored features stay here: the step copies them
        batch.images = images  # the loader decodes on the GPU (DALI)
    gen = torch.Generator(device=device).manual_seed(0)
    counts = {}

    def step():
        layout = model.step_layout(batch)
        with amp:
            out = model(batch, generator=gen, validate=False, layout=layout)
        out.loss.backward()
        clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        counts["target"] = out.num_tokens["total"]
        if device.type == "cuda":
            torch.cuda.synchronize()

    input_tokens = batch.num_input_tokens(cfg.qformer.num_query_tokens)
    vit_params = sum(p.numel() for p in model.image_encoder.clip.parameters())
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1
    info = dict(model=model, step=step, counts=counts, input_tokens=input_tokens,
                trainable=model.num_parameters(trainable_only=True), vit_params=vit_params,
                vit_tokens=0 if provider == "features" else batch.num_images * patches,
                device=device, flops=flops)
    return info


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider):
    s = _setup(provider)
    step, device = s["step"], s["device"]
    step()  # lazy initialisation, autotuning, optimizer state
    with PeakMemory(device) as mem:
        step()
    benchmark.group = "train_step"
    times = []

    def timed():
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    sec = statistics.median(times[WARMUP:])
    tokens = s["counts"]["target"] + s["input_tokens"]
    peak = peak_flops(device, torch.bfloat16) if device.type == "cuda" else None
    train_flops = 6.0 * s["trainable"] * tokens / sec
    vit_flops = 2.0 * s["vit_params"] * s["vit_tokens"] / sec
    flops = s["flops"]
    row = {
        "samples": SAMPLES, "step_ms": sec * 1e3, "samples_per_s": SAMPLES / sec,
        "tokens_per_s": tokens / sec, "gflop_per_sample": flops["total"] / SAMPLES / 1e9,
        "vit_share": flops["vit"] / flops["total"] if provider != "features" else 0.0,
        "achieved_tflops": flops["total"] / sec / 1e12,
        "mfu_trainable": train_flops / peak if peak else None,
        "mfu_with_frozen_vit": (train_flops + vit_flops) / peak if peak else None,
        "peak_mem_mb": mem.extra_mb,
    }
    benchmark.extra_info.update(device=device_name(device), torch=torch.__version__,
                                model="paper" if CUDA else "tiny", **row)
    _RESULTS[provider] = row
    _write_summary(device)


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def paper_step_flops() -> dict[str, float]:
    """The paper-size step's FLOPs by part (:func:`benchmarks.step_flops.step_flops`, counted
    on the layout of the GPU case's batch: nothing runs)."""
    cfg = config_for("paper")
    return step_flops(cfg, batch_for(cfg, SAMPLES_GPU, images=False))


def _write_summary(device):
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    ours = _RESULTS.get("ours")
    lines = [f"# UniGen training step ({'paper' if CUDA else 'tiny'} model, {SAMPLES} samples)",
             "", f"device: {device_name(device)}, torch {torch.__version__}", "",
             "| provider | step ms | samples/s | tokens/s | GFLOP/sample | ViT share | "
             "MFU (trainable) | MFU (+ frozen ViT) | peak MB | ours speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in _RESULTS.items():
        speed = r["step_ms"] / ours["step_ms"] if ours else None
        lines.append(f"| {name} | {r['step_ms']:.1f} | {r['samples_per_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['gflop_per_sample']:.3f} | "
                     f"{r['vit_share']:.1%} | {_fmt(r['mfu_trainable'], '.3f')} | "
                     f"{_fmt(r['mfu_with_frozen_vit'], '.3f')} | {r['peak_mem_mb']:.0f} | "
                     f"{_fmt(speed, '.2f')}× |")
    ratios = {}
    if ours and "features" in _RESULTS:
        ratios["features_over_ours_samples_per_s"] = (_RESULTS["features"]["samples_per_s"]
                                                      / ours["samples_per_s"])
        lines += ["", f"features / ours samples/s: "
                      f"{ratios['features_over_ours_samples_per_s']:.2f}× (same run; the GPU "
                      f"goal is >= 2×)"]
    paper = paper_step_flops()
    lines += ["", f"Paper-size step ({SAMPLES_GPU} samples), FLOPs counted by "
                  f"benchmarks/step_flops.py: {paper['total'] / 1e12:.2f} TFLOP, of which the "
                  f"frozen ViT {paper['vit'] / paper['total']:.1%} ("
              + ", ".join(f"{k} {v / paper['total']:.1%}" for k, v in paper.items()
                          if k not in ("total", "vit")) + ")"]
    (folder / "train_step.md").write_text("\n".join(lines) + "\n")
    (folder / "train_step.json").write_text(json.dumps(
        {"device": device_name(device), "torch": torch.__version__, "samples": SAMPLES,
         "results": _RESULTS, "ratios": ratios, "paper_step_flops": paper}, indent=1))
