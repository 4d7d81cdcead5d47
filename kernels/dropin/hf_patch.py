"""Drop-in fused training loss for transformers causal language models.

``patch_hf_model(model)`` replaces the *instance's* ``forward``: whenever ``labels`` are given, the
loss comes from :func:`fused_linear_cross_entropy` applied to the base model's last hidden states
and the LM head's weight (and bias), so the ``[tokens, vocab]`` logits are never formed and
``outputs.logits`` is ``None`` (as with Liger's and Cut Cross-Entropy's patches). Without
``labels`` (evaluation, ``generate``) the original forward runs untouched.

The loss follows transformers' ``ForCausalLMLoss`` exactly:

- labels are shifted inside (``labels`` padded with ``ignore_index`` on the right, position t
  predicts label t+1), or ``shift_labels`` is used as given;
- ``ignore_index`` (default -100) rows carry no loss;
- ``num_items_in_batch`` (the Trainer's gradient-accumulation normaliser) switches the reduction to
  ``sum / num_items_in_batch``, otherwise the mean over non-ignored tokens;
- Gemma 2's ``final_logit_softcapping`` is the op's ``softcap``; a head bias is passed on; tied
  heads need nothing special (the gradient reaches the shared parameter through both uses).

Only ``transformers`` models of the families in :data:`SUPPORTED_MODEL_TYPES` are accepted (each
was checked against its modeling file: they all compute ``lm_head(hidden[..., keep, :])`` followed
by ``ForCausalLMLoss``); anything else raises. transformers itself is imported only when a model is
patched, so ``unigen.kernels`` does not depend on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import torch

from ..fused_linear_cross_entropy import fused_linear_cross_entropy

OP = "patch_hf_model"

# config.model_type -> (the *ForCausalLM class, attribute holding the base model, output class).
SUPPORTED_MODEL_TYPES = {
    "gpt2": ("GPT2LMHeadModel", "transformer", "CausalLMOutputWithCrossAttentions"),
    "llama": ("LlamaForCausalLM", "model", "CausalLMOutputWithPast"),
    "mistral": ("MistralForCausalLM", "model", "CausalLMOutputWithPast"),
    "qwen2": ("Qwen2ForCausalLM", "model", "CausalLMOutputWithPast"),
    "gemma2": ("Gemma2ForCausalLM", "model", "CausalLMOutputWithPast"),
    "phi3": ("Phi3ForCausalLM", "model", "CausalLMOutputWithPast"),
}
_OPTIONS = ("backend",)
_STATE = "_unigen_fused_loss"  # the instance attribute holding what unpatch restores


@dataclasses.dataclass(frozen=True)
class _PatchState:
    had_own_forward: bool  # the instance had a ``forward`` attribute of its own before patching
    original_forward: object


def _supported_list() -> str:
    return ", ".join(f"{cls} ({t})" for t, (cls, _, _) in SUPPORTED_MODEL_TYPES.items())


def _import_transformers():
    """transformers, imported here and only here: ``unigen.kernels`` itself does not need it."""
    try:
        import transformers.loss.loss_utils  # noqa: F401  (the shared ForCausalLMLoss, >= 4.46)
        import transformers.modeling_outputs  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{OP} needs transformers >= 4.46 (pip install transformers): {exc}") from exc


def _check_model(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{OP}: model must be a transformers causal-LM instance (torch.nn.Module), "
                        f"got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    entry = SUPPORTED_MODEL_TYPES.get(model_type)
    if entry is None or type(model).__name__ != entry[0]:
        raise ValueError(f"{OP}: unsupported model {type(model).__name__} (model_type={model_type!r}); "
                         f"supported: {_supported_list()}")
    from transformers.loss.loss_utils import LOSS_MAPPING

    if model.loss_function is not LOSS_MAPPING["ForCausalLM"]:
        raise ValueError(f"{OP}: {type(model).__name__} uses a custom loss_function "
                         f"({getattr(model.loss_function, '__name__', model.loss_function)!r}); the patch "
                         f"replaces transformers' ForCausalLMLoss only")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{OP}: the output embeddings of {type(model).__name__} must be an nn.Linear, "
                         f"got {type(head).__name__}")
    return entry


def patch_hf_model(model, **options):
    """Make ``model(..., labels=labels).loss`` use the fused linear cross-entropy (no logits).

    Args:
        model: a transformers causal-LM instance of a family in :data:`SUPPORTED_MODEL_TYPES`.
        backend: the op's backend (``"auto"``: Triton on CUDA, the C++ op on CPU).

    Returns:
        ``model`` itself, patched in place. Patching again replaces the options (the forward is never
        wrapped twice); :func:`unpatch_hf_model` restores the original forward.

    With ``labels`` the output's ``logits`` is ``None``; ``loss``, ``cache``, ``hidden_states`` and
    ``attentions`` are the model's own. Under ``torch.autocast`` the loss is fp32 (see the op).
    """
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"{OP}: unknown option(s) {sorted(unknown)}; expected some of {list(_OPTIONS)}")
    backend = options.get("backend", "auto")
    _import_transformers()
    _, base_attr, out_name = _check_model(model)
    if getattr(model, _STATE, None) is not None:
        unpatch_hf_model(model)

    import transformers.modeling_outputs as outputs

    out_cls = getattr(outputs, out_name)
    out_fields = tuple(f.name for f in dataclasses.fields(out_cls) if f.name not in ("loss", "logits"))
    original = model.forward  # bound: the instance's own attribute or the class's method
    params = inspect.signature(original).parameters
    # Positional arguments are matched to these names (the families order them differently:
    # GPT-2 takes `cache` second, Llama `attention_mask`).
    positional = tuple(n for n, p in params.items()
                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    caps_logits = model.config.model_type == "gemma2"  # the one family with a logit soft-cap
    slice_to_keep = _resolve_slice_to_keep()  # never imported inside the (traced) forward

    @functools.wraps(original)  # keeps the signature generate() and Trainer inspect
    def forward(*args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{type(model).__name__}.forward takes at most {len(positional)} positional "
                            f"arguments, got {len(args)}")
        for name, value in zip(positional, args):  # labels may come positionally too
            if name in kwargs:
                raise TypeError(f"{type(model).__name__}.forward got multiple values for argument {name!r}")
            kwargs[name] = value
        labels = kwargs.pop("labels", None)
        if labels is None:
            return original(**kwargs)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = model.config.return_dict
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        # ForCausalLMLoss's keyword arguments; the base model receives them too, as in transformers
        num_items_in_batch = kwargs.get("num_items_in_batch")
        ignore_index = kwargs.get("ignore_index", -100)
        shift_labels = kwargs.get("shift_labels")
        # looked up per call, so a head replaced after patching (resize_token_embeddings) is used
        base, head = getattr(model, base_attr), model.get_output_embeddings()
        base_out = base(**kwargs)
        hidden = slice_to_keep(base_out.last_hidden_state, logits_to_keep)
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.reshape(-1).to(hidden.device)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if hidden.shape[0] != shift_labels.shape[0]:
            raise ValueError(f"{OP}: {hidden.shape[0]} kept positions (logits_to_keep={logits_to_keep!r}) but "
                             f"{shift_labels.shape[0]} labels; train with logits_to_keep=0")
        # read per call, as the model does: a config changed after patching is honoured
        softcap = model.config.final_logit_softcapping if caps_logits else None
        loss = fused_linear_cross_entropy(
            hidden, head.weight, shift_labels, head.bias, ignore_index=ignore_index, softcap=softcap,
            reduction="sum" if num_items_in_batch is not None else "mean", backend=backend)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        out = out_cls(loss=loss, logits=None, **{f: getattr(base_out, f, None) for f in out_fields})
        return out if return_dict else out.to_tuple()

    state = _PatchState(had_own_forward="forward" in model.__dict__, original_forward=original)
    model.forward = forward
    object.__setattr__(model, _STATE, state)  # not a submodule or parameter: plain attribute
    return model


def _inline_slice_to_keep(hidden, logits_to_keep):
    """The int/tensor slice that releases without ``slice_logits_to_keep`` inline in every model."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
    return hidden[:, logits_to_keep, :]


def _resolve_slice_to_keep():
    """transformers' ``slice_logits_to_keep`` where the installed release has it (5.2x), else the
    inline slice of the releases without it (5.17 and older).

    Resolved once, when the model is patched: an import attempted inside the forward would run
    (and, failing, raise and catch an ImportError) inside every traced forward, which breaks
    torch.compile's graph.
    """
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return _inline_slice_to_keep
    return slice_logits_to_keep


def unpatch_hf_model(model):
    """Restore the forward :func:`patch_hf_model` replaced (a no-op on an unpatched model)."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    if state.had_own_forward:
        model.forward = state.original_forward
    else:
        del model.forward  # the class's forward shows through again
    object.__delattr__(model, _STATE)
    return model


def is_hf_model_patched(model) -> bool:
    return getattr(model, _STATE, None) is not None


@contextlib.contextmanager
def patched_hf_model(model, **options):
    """``with patched_hf_model(model): ...`` patches for the block and restores the model after."""
    was_patched = is_hf_model_patched(model)
    patch_hf_model(model, **options)
    try:
        yield model
    finally:
        if not was_patched:
            unpatch_hf_model(model)
