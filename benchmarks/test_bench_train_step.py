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
- ``ours_apex``: the same with NVIDIA apex's ``FusedAdam`` (AdamW mode) and ``FusedLayerNorm``
  in place of torch's fused AdamW and ``nn.LayerNorm``, where apex is installed (it is not on
  PyPI and not on the GPU machine: see benchmarks/fetch_gpu_wheels.sh; the row skips);
- ``naive``: padded SDPA attention, ``F.cross_entropy`` on the full logits per task, the
  LAVIS-style PyTorch contrastive loss and mining.

Per provider: step time, samples/s, tokens/s (target and input tokens), MFU (the trainable
parameters' 6·N·tokens, and separately with the frozen ViT's forward 2·N_vit·tokens_vit added;
attention FLOPs not counted; GPUs with a known peak only) and peak memory. The summary with the
ratio naive / ours measured in the same run goes to ``train_step.json`` / ``train_step.md`` in
``$OUT`` (when set) or ``benchmarks/results/local/``.
"""

import json
import statistics
import time

import pytest
import torch

from benchmarks.conftest import bench_device, device_name, optional, results_dir, tiny_shapes
from unigen.memory import PeakMemory
from unigen.model.batch import UniGenBatch
from unigen.model.config import UniGenConfig
from unigen.model.unigen_model import UniGen
from unigen.training.config import OptimConfig
from unigen.training.distributed import clip_grad_norm
from unigen.training.metrics import peak_flops
from unigen.training.optim import build_optimizer, trainable_param_groups

CUDA = torch.cuda.is_available()
if CUDA:
    SAMPLES, ROUNDS, WARMUP = 64, 5, 2  # the paper's 512 over 8 GPUs
else:
    SAMPLES, ROUNDS, WARMUP = (8, 1, 0) if tiny_shapes() else (16, 3, 1)
PROVIDERS = ["ours", "naive", "ours_apex"]
_RESULTS: dict[str, dict] = {}


def _config() -> UniGenConfig:
    cfg = UniGenConfig.paper() if CUDA else UniGenConfig.tiny()
    cfg.tasks.match_yes_ids, cfg.tasks.match_no_ids, cfg.tasks.eos_token_id = (4,), (5,), 2
    cfg.__post_init__()
    return cfg


def _batch(cfg: UniGenConfig, samples: int, seed: int = 0) -> UniGenBatch:
    """``samples`` samples in the paper's task mix: a quarter each of trans, cap, qus and
    image-text pairs (each pair a [match] "yes", two mined "no" and an L_CL pair); CC3M-like
    lengths (texts up to text.max_length, targets of 8-24 tokens)."""
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
    return UniGenBatch(
        task=task, image_index=image_index, text_index=text_index, target_ids=target_ids,
        target_cu_seqlens=cu, images=torch.randn(n_img, 3, size, size, generator=g),
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
    batch = _batch(cfg, SAMPLES)
    if device.type == "cuda":
        images = batch.images.to(device)  # the loader decodes on the GPU (DALI)
        batch = batch.pin_memory()
        batch.images = images
    gen = torch.Generator(device=device).manual_seed(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
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
                vit_tokens=batch.num_images * patches, device=device)
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
    row = {
        "samples": SAMPLES, "step_ms": sec * 1e3, "samples_per_s": SAMPLES / sec,
        "tokens_per_s": tokens / sec, "mfu_trainable": train_flops / peak if peak else None,
        "mfu_with_frozen_vit": (train_flops + vit_flops) / peak if peak else None,
        "peak_mem_mb": mem.extra_mb,
    }
    benchmark.extra_info.update(device=device_name(device), torch=torch.__version__,
                                model="paper" if CUDA else "tiny", **row)
    _RESULTS[provider] = row
    _write_summary(device)


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def _write_summary(device):
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    ours = _RESULTS.get("ours")
    lines = [f"# UniGen training step ({'paper' if CUDA else 'tiny'} model, {SAMPLES} samples)",
             "", f"device: {device_name(device)}, torch {torch.__version__}", "",
             "| provider | step ms | samples/s | tokens/s | MFU (trainable) | MFU (+ frozen ViT) "
             "| peak MB | ours speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in _RESULTS.items():
        speed = r["step_ms"] / ours["step_ms"] if ours else None
        lines.append(f"| {name} | {r['step_ms']:.1f} | {r['samples_per_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {_fmt(r['mfu_trainable'], '.3f')} | "
                     f"{_fmt(r['mfu_with_frozen_vit'], '.3f')} | {r['peak_mem_mb']:.0f} | "
                     f"{_fmt(speed, '.2f')}× |")
    (folder / "train_step.md").write_text("\n".join(lines) + "\n")
    (folder / "train_step.json").write_text(json.dumps(
        {"device": device_name(device), "torch": torch.__version__, "samples": SAMPLES,
         "results": _RESULTS}, indent=1))
