"""Every causal LM (and image-text-to-text model) of the installed transformers, built tiny from
its config, and the check of ``patch_hf_model`` on it: patched against unpatched loss and
gradients, or the refusal and its reason.

Used by ``test_hf_families.py`` (parametrised over the families) and run as a script for the
coverage report (``python tests/kernels/hf_families.py --out docs/dropin_coverage.md``).
Nothing downloads: each model is built from its config class with every size field it has made
tiny (the same override table for every family; a family that does not build that way is
reported as such, with the error).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import signal
import sys
import time
import warnings

import torch

VOCAB = 301  # odd, so no tile divides it

# The size fields of transformers' configs, made tiny. Only the fields a config class has are
# passed; sub-configs (text_config, vision_config, ...) get the same table.
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    n_embd=32, n_layer=2, n_head=4, n_positions=128, n_inner=48, n_ctx=128, d_model=32, d_ff=48,
    num_layers=2, num_heads=4, ffn_dim=48, d_kv=8, embed_dim=32, dim=32, n_layers=2, n_heads=4,
    hidden_dim=48, num_decoder_layers=2, decoder_layers=2, encoder_layers=2,
    decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=48, encoder_ffn_dim=48,
    moe_intermediate_size=24, shared_expert_intermediate_size=24, expert_intermediate_size=24,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, n_group=1, topk_group=1, moe_num_experts=4, moe_topk=2, moe_k=2, top_k=2,
    first_k_dense_replace=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    num_key_value_groups=2, global_head_dim=8, sliding_window=16, attention_chunk_size=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, mamba_n_groups=1, mamba_expand=2,
    attn_layer_period=2, attn_layer_offset=1,
    ssm_state_size=8, state_size=8, conv_kernel=4, mamba_d_conv=4, time_step_rank=4,
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, laurel_rank=4,
    altup_num_inputs=2, num_kv_shared_layers=0, projector_hidden_size=32,
    # vision towers
    image_size=32, patch_size=8, num_channels=3, spatial_merge_size=2, temporal_patch_size=2,
    out_hidden_size=32, depth=2, num_position_embeddings=64, mm_tokens_per_image=4, projection_dim=32,
    image_seq_length=4, mm_hidden_size=32, vision_output_dim=64, intermediate_layers_indices=[0],
)

# What the table cannot express for a few families, by model type (still tiny): multimodal
# rotary sections summing to head_dim / 2, Chameleon's image-token vocabulary.
_MROPE = {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [1, 1, 2]}}}
EXTRA = {
    "qwen2_vl": _MROPE, "qwen2_5_vl": _MROPE, "glm4v": _MROPE, "glm4v_moe": _MROPE, "glm46v": _MROPE,
    "glm_ocr": _MROPE, "paddleocr_vl": _MROPE,
    "recurrent_gemma": {"num_hidden_layers": 3},  # its block pattern has attention third
    "chameleon": {"vq_config": {"embed_dim": 32, "num_embeddings": 16, "base_channels": 32,
                                "channel_multiplier": [1, 2], "latent_channels": 32, "resolution": 32},
                  "vocabulary_map": {"<image>": VOCAB - 1, "IMGIMGAZ": VOCAB - 2, "IMGIMGBZ": VOCAB - 3}},
}
# A second try for families whose attention needs as many key/value heads as query heads (MLA).
RETRY = {"num_key_value_heads": 4}

TINY_BUILD_TIMEOUT_S = 60

# Families whose forward computed its own loss (its own nn.CrossEntropyLoss, not
# self.loss_function) before transformers 5.17, so the patch refuses them there: read in the
# released wheels, 5.6.0 to 5.16.1 against 5.17.0.
OWN_LOSS_BEFORE_5_17 = ("gemma3", "blip-2")


def computes_its_own_loss(model_type: str) -> bool:
    """Whether the installed transformers' ``model_type`` computes its loss itself."""
    import transformers
    from packaging.version import Version

    return model_type in OWN_LOSS_BEFORE_5_17 and Version(transformers.__version__) < Version("5.17")
MAX_TINY_PARAMS = 2_000_000


def family_classes():
    """``(model_type, class name)`` of every causal LM and image-text-to-text model of the
    installed transformers (its auto mappings), sorted."""
    from transformers.models.auto import modeling_auto

    names = set()
    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                    modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        for model_type, cls in mapping.items():
            for name in (cls if isinstance(cls, (list, tuple)) else [cls]):
                names.add((model_type, name))
    return sorted(names)


def _fields(config_cls):
    try:
        return set(inspect.signature(config_cls).parameters)
    except (TypeError, ValueError):
        return set()


def _default(config_cls):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return config_cls()
    except Exception:  # a config without usable defaults: its sub-configs are left alone
        return None


SPECIAL_IDS = range(VOCAB - 40, VOCAB)  # image/video/audio token ids of the tiny vocabulary


def _tiny_kwargs(config_cls, default, special, extra):
    fields = _fields(config_cls)
    subs = getattr(config_cls, "sub_configs", {})
    here = {k: v for k, v in extra.items() if k not in subs}
    kwargs = {k: copy.deepcopy(v) for k, v in {**TINY, **here}.items() if k in fields}
    pattern = getattr(default, "layer_types", None) if default is not None else None
    if "layer_types" in fields and isinstance(pattern, (list, tuple)) and len(set(pattern)) > 1:
        # a hybrid stack: one layer of each kind, in the order the full model has them
        kinds = list(dict.fromkeys(pattern))
        kwargs["layer_types"] = kinds
        if "num_hidden_layers" in fields:
            kwargs["num_hidden_layers"] = len(kinds)
    for key, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if key in fields:
            kwargs[key] = value
    if default is None:
        return kwargs
    for key in sorted(fields):
        value = getattr(default, key, None)
        if (key.endswith(("_token_id", "_token_index", "_id")) and key not in kwargs
                and isinstance(value, int) and not isinstance(value, bool) and value >= VOCAB - 40):
            kwargs[key] = special.pop()  # a special token of the tiny vocabulary
    for name in subs:
        sub = getattr(default, name, None)
        if name not in fields or sub is None or not hasattr(sub, "model_type"):
            continue
        sub_kwargs = _tiny_kwargs(type(sub), sub, special, extra.get(name, {}))
        sub_kwargs["model_type"] = sub.model_type
        kwargs[name] = sub_kwargs
    return kwargs


def tiny_config(model_type, config_cls=None, retry=False):
    """``config_cls`` (or the model type's) with every size field of :data:`TINY` it or its
    sub-configs have made tiny, special token ids moved into the tiny vocabulary."""
    import transformers

    config_cls = config_cls or transformers.CONFIG_MAPPING[model_type]
    extra = {**EXTRA.get(model_type, {}), **VLM_EXTRA.get(model_type, {}), **(RETRY if retry else {})}
    return config_cls(**_tiny_kwargs(config_cls, _default(config_cls), list(SPECIAL_IDS), extra))


@contextlib.contextmanager
def _time_limit(seconds):
    def fail(*_):
        raise TimeoutError(f"took over {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def build_tiny(model_type, class_name, seed=0, retry=False):
    """The tiny model in eval mode (no dropout: both runs see one network), or an exception."""
    import transformers

    cls = getattr(transformers, class_name)
    torch.manual_seed(seed)
    config = tiny_config(model_type, getattr(cls, "config_class", None), retry=retry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # count first: a size field the table misses stays full size
            n_params = sum(p.numel() for p in cls(config).parameters())
        if n_params > MAX_TINY_PARAMS:
            raise ValueError(f"{n_params / 1e6:.0f}M parameters with the tiny sizes (a size field "
                             f"the table does not know)")
        model = cls(config)
    model = model.float().eval()
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            # the init's std (~0.02) gives logits ~0.03: widen the head so the softmax is peaked
            # and a wrong gradient shows (and a soft-cap bends the logits)
            head.weight.mul_(20.0)
            if head.bias is not None:
                head.bias.normal_(0, 0.5)
    return model


def text_batch(model, seed=1, batch=2, seq=9):
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if isinstance(head, torch.nn.Linear) else VOCAB
    embed = model.get_input_embeddings()
    n_in = embed.num_embeddings if hasattr(embed, "num_embeddings") else vocab
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, n_in, SPECIAL_IDS.start), (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that carries no loss
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclasses.dataclass
class FamilyResult:
    model_type: str
    class_name: str
    status: str  # "patched", "refused", "mismatch", "no tiny build", "error"
    detail: str = ""
    processing: str = ""
    loss_diff: float = float("nan")
    grad_diff: float = float("nan")
    seconds: float = 0.0


def loss_and_grads(model, batch):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = model(**batch)
    grads = torch.autograd.grad(out.loss, [p for _, p in params], allow_unused=True)
    return out, {n: g for (n, _), g in zip(params, grads)}


def compare(model, batch, rtol=1e-4, atol=1e-5):
    """Patched vs unpatched: (loss diff, largest relative gradient diff, message or "")."""
    from unigen.kernels import patch_hf_model

    ref, ref_grads = loss_and_grads(model, batch)
    patch_hf_model(model)
    out, grads = loss_and_grads(model, batch)
    problems = []
    if getattr(out, "logits", None) is not None:
        problems.append("logits returned")
    loss_diff = (out.loss.double() - ref.loss.double()).abs().item()
    if not torch.allclose(out.loss.double(), ref.loss.double(), rtol=rtol, atol=atol):
        problems.append(f"loss {out.loss.item():.6g} vs {ref.loss.item():.6g}")
    worst, worst_name = 0.0, ""
    for name, g in grads.items():
        r = ref_grads[name]
        if (g is None) != (r is None):
            problems.append(f"{name}: gradient {'missing' if g is None else 'extra'}")
            continue
        if g is None:
            continue
        # atol relative to the tensor's scale (a projection's gradient reaches ~1e3 here)
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        err = ((g - r).abs() / (atol * scale + rtol * r.abs())).max().item() if g.numel() else 0.0
        if err > worst:
            worst, worst_name = err, name
    if worst > 1.0:
        problems.append(f"gradient of {worst_name} off by {worst:.3g}× the tolerance")
    return loss_diff, worst, "; ".join(problems)


def tiny_model_and_batch(model_type, class_name):
    """(model, text batch, None) once an unpatched training step runs on the tiny model (the
    table's sizes, then :data:`RETRY`), else (None, None, the first failure)."""
    failure = None
    for retry in (False, True):
        try:
            model = build_tiny(model_type, class_name, retry=retry)
        except Exception as exc:  # reported, not raised: the family does not build tiny
            failure = failure or f"{type(exc).__name__}: {_short(exc)}"
            continue
        batch = text_batch(model)
        try:
            loss_and_grads(model, batch)
        except Exception as exc:
            failure = failure or f"unpatched step fails: {type(exc).__name__}: {_short(exc)}"
            continue
        return model, batch, None
    return None, None, failure


def _plan_on_meta(model_type, class_name):
    """What the patch reads from the family's code, from a model built on the meta device
    (its default config): the coverage of families that do not run tiny."""
    import transformers

    from unigen.kernels.dropin.hf_patch import read_hf_model

    try:
        cls = getattr(transformers, class_name)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = cls(cls.config_class() if getattr(cls, "config_class", None) else tiny_config(model_type))
    except Exception:
        return ""
    try:
        return f" — not run; the patch would fuse it ({read_hf_model(model).describe()})"
    except ValueError as exc:
        return f" — not run; the patch refuses it: {str(exc).split(': ', 2)[-1]}"


def check_family(model_type, class_name) -> FamilyResult:
    from unigen.kernels.dropin.hf_patch import read_hf_model

    start = time.perf_counter()
    result = FamilyResult(model_type, class_name, "error")
    try:
        with _time_limit(TINY_BUILD_TIMEOUT_S):
            model, batch, failure = tiny_model_and_batch(model_type, class_name)
            if model is None:
                result.status, result.detail = "no tiny build", failure + _plan_on_meta(model_type, class_name)
                return result
            try:
                plan = read_hf_model(model)
            except ValueError as exc:
                result.status, result.detail = "refused", str(exc).split(": ", 2)[-1]
                return result
            result.processing = plan.describe()
            loss_diff, grad_err, problems = compare(model, batch)
            result.loss_diff, result.grad_diff = loss_diff, grad_err
            result.status, result.detail = ("mismatch", problems) if problems else ("patched", "")
    except Exception as exc:
        result.status, result.detail = "error", f"{type(exc).__name__}: {_short(exc)}"
    finally:
        result.seconds = time.perf_counter() - start
    return result


def _short(exc, n=160):
    text = " ".join(str(exc).split())
    return text[:n] + ("…" if len(text) > n else "")


def report(results, versions) -> str:
    counts = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [
        "# patch_hf_model: coverage of the installed transformers",
        "",
        f"Generated by `python tests/kernels/hf_families.py --out docs/dropin_coverage.md` ({versions}). "
        "Every causal LM and image-text-to-text class of transformers' auto mappings, built tiny "
        "from its config (fp32, CPU, eval mode), one text batch with a masked prompt: the patched "
        "loss and every parameter's gradient against the unpatched model's (rtol 1e-4, atol 1e-5 "
        "times the gradient's largest entry). "
        "`processing` is what the patch read between the head and the loss.",
        "",
        "Summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])),
        "",
        "| model_type | class | result | processing / reason | loss diff | worst grad err (× tol) |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in results:
        what = r.processing if r.status == "patched" else r.detail
        what = what.replace("|", "\\|")
        loss = f"{r.loss_diff:.1e}" if r.loss_diff == r.loss_diff else ""
        grad = f"{r.grad_diff:.2f}" if r.grad_diff == r.grad_diff else ""
        lines.append(f"| {r.model_type} | {r.class_name} | {r.status} | {what} | {loss} | {grad} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown report here")
    parser.add_argument("--only", nargs="*", help="model types to check")
    args = parser.parse_args(argv)
    import resource

    import transformers
    import transformers.utils.logging as hf_logging

    # a family whose tiny build still allocates gigabytes fails with an error, not the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, resource.RLIM_INFINITY))
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    results = []
    for model_type, class_name in family_classes():
        if args.only and model_type not in args.only:
            continue
        r = check_family(model_type, class_name)
        what = r.processing if r.status == "patched" else r.detail
        print(f"{r.status:14s} {class_name:48s} {r.seconds:5.1f}s {what}", flush=True)
        results.append(r)
    versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    text = report(results, versions)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text.split("\n\n")[3])
    return 0



# ---------------------------------------------------------------------------------------------
# vision-language models: a batch with images (the processors' layout, built by hand: no
# tokenizer or image processor downloads)
# ---------------------------------------------------------------------------------------------

VLM_EXTRA = {  # anyres grids the tiny vision tower can tile
    "llava_next": {"image_grid_pinpoints": [[32, 32], [32, 64], [64, 32]]},
    "mllama": {"text_config": {"cross_attention_layers": [1]}},  # a layer that sees the image
}


def _with_images(ids_before, n_image, image_id, ids_after, start_id=None, end_id=None):
    row = list(ids_before) + ([start_id] if start_id is not None else []) + [image_id] * n_image
    row += ([end_id] if end_id is not None else []) + list(ids_after)
    return row


def image_batch(model_type, model, seed=2, batch=2):
    """``(inputs, n_image_tokens)``: ``batch`` sequences, each with one image (pixel values in
    the family's layout, the image tokens the model expects), some text before and after, and
    labels masking the image tokens and a prompt, as the processors and collators do."""
    cfg = model.config
    vc = cfg.vision_config
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, SPECIAL_IDS.start, (n,), generator=g).tolist()  # noqa: E731
    size, patch = getattr(vc, "image_size", None) or 32, vc.patch_size
    pixels = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    image_id = getattr(cfg, "image_token_id", None)
    if image_id is None:
        image_id = cfg.image_token_index
    extra = {}
    start = end = None
    if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        grid = (1, size // patch if size != 32 else 4, 4)
        merge, temporal = vc.spatial_merge_size, vc.temporal_patch_size
        n_patches = grid[0] * grid[1] * grid[2]
        extra["pixel_values"] = pixels(batch * n_patches, vc.in_channels * temporal * patch * patch)
        extra["image_grid_thw"] = torch.tensor([grid] * batch)
        n_image = n_patches // merge**2
        start, end = cfg.vision_start_token_id, cfg.vision_end_token_id
    elif model_type in ("llava", "paligemma"):
        extra["pixel_values"] = pixels(batch, 3, size, size)
        n_image = (size // patch) ** 2
    elif model_type == "llava_next":
        extra["pixel_values"] = pixels(batch, 3, 3, size, size)  # base + a 1x2 grid of tiles
        extra["image_sizes"] = torch.tensor([[size, 2 * size]] * batch)
        feats = model.model.get_image_features(pixel_values=extra["pixel_values"], image_sizes=extra["image_sizes"])
        feats = getattr(feats, "pooler_output", feats)
        n_image = feats[0].shape[0]
    elif model_type == "gemma3":
        extra["pixel_values"] = pixels(batch, 3, size, size)
        n_image = cfg.mm_tokens_per_image
        start, end = cfg.boi_token_index, cfg.eoi_token_index
    elif model_type in ("idefics3", "smolvlm"):
        extra["pixel_values"] = pixels(batch, 1, 3, size, size)
        n_image = (size // patch) ** 2 // cfg.scale_factor**2
    elif model_type == "mllama":
        tiles = 1
        extra["pixel_values"] = pixels(batch, 1, vc.max_num_tiles, 3, size, size)
        extra["aspect_ratio_ids"] = torch.ones(batch, 1, dtype=torch.long)  # (1, 1): one tile
        extra["aspect_ratio_mask"] = torch.tensor([[[1] + [0] * (vc.max_num_tiles - 1)]] * batch)
        n_image = 1
        del tiles
    else:
        raise KeyError(model_type)
    rows, labels = [], []
    for _ in range(batch):
        row = _with_images(text(3), n_image, image_id, text(6), start, end)
        rows.append(row)
        lab = [-100 if t in (image_id, start, end) else t for t in row]
        lab[:2] = [-100, -100]  # a prompt
        labels.append(lab)
    ids = torch.tensor(rows)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(labels), **extra}
    if model_type in ("gemma3", "paligemma"):
        inputs["token_type_ids"] = (ids == image_id).long()
    if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        inputs["mm_token_type_ids"] = (ids == image_id).long()  # 1: image (the processor's)
    if model_type == "mllama":
        mask = torch.zeros(batch, ids.shape[1], 1, vc.max_num_tiles, dtype=torch.long)
        mask[:, :, :, 0] = 1  # every text token sees the image's one tile
        inputs["cross_attention_mask"] = mask
    return inputs, n_image


if __name__ == "__main__":
    sys.exit(main())
