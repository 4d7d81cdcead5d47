"""Drop-in fused training loss for transformers language models: any causal LM, and the
vision-language models whose text loss is ``ForCausalLMLoss``.

``patch_hf_model(model)`` makes ``model(..., labels=labels).loss`` come from
:func:`fused_linear_cross_entropy`, so the ``[tokens, vocab]`` logits are never formed and
``outputs.logits`` is ``None`` (as with Liger's and Cut Cross-Entropy's patches). Without
``labels`` (evaluation, ``generate``) nothing changes.

Which models, decided from their structure (no list of families):

- the output embeddings (``get_output_embeddings()``) is an ``nn.Linear``;
- the model's ``loss_function`` is transformers' ``ForCausalLMLoss`` (``*ForCausalLM`` and
  ``*ForConditionalGeneration`` share it);
- its ``forward`` calls the head once and the loss once, on the head's logits and its own
  ``labels``, and what it does to the logits in between is something the op expresses: a scale
  (Cohere, Granite, ``output_multiplier``; applied as ``hidden·s``, ``bias·s``: the same
  linear), a soft-cap (Gemma 2/3/4, PaliGemma, NanoChat, ...: the op's ``softcap``), a slice of
  a padded vocabulary, casts — read from the forward's source by
  :mod:`unigen.kernels.dropin.hf_structure`, which names the line it cannot express when it
  refuses (Chameleon's write of -inf into the image tokens' logits, a head called twice, a loss
  computed another way).

How: the model's own ``forward`` runs unchanged, with two of its calls intercepted for a call
with ``labels``. The head's ``forward`` (inside the head's ``__call__``, after every pre-hook:
FSDP2 has all-gathered the weight, a tensor-parallel plan has laid out the input) computes the
fused loss from the hidden states it receives and the head's weight and bias as the setup holds
them (a plain tensor, FSDP2's unsharded parameter, or a vocabulary-sharded DTensor, which runs
the vocabulary-parallel op), and returns a ``[..., 1]`` stand-in instead of logits; the
family's processing runs on the stand-in (cheaply), and ``self.loss_function`` returns the fused
loss. So whatever the family adds to its loss (a router's auxiliary loss) it still adds, its
output class and fields are its own, and only ``logits`` is dropped. The loss is the one of
``ForCausalLMLoss``: the label shift (or ``shift_labels`` as given), ``ignore_index``,
``num_items_in_batch`` (the Trainer's gradient-accumulation normaliser: ``sum /
num_items_in_batch``, else the mean over non-ignored tokens).

transformers itself is imported only when a model is patched, so ``unigen.kernels`` does not
depend on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import torch

from ..fused_linear_cross_entropy import fused_linear_cross_entropy
from .hf_structure import LogitParams, Unsupported, evaluate_plan, read_forward

OP = "patch_hf_model"

# The allow-list of the first version of the patch, kept for code that imported it. It gates
# nothing any more: every model whose structure fits is accepted (see the module docstring).
SUPPORTED_MODEL_TYPES = {
    "gpt2": ("GPT2LMHeadModel", "transformer", "CausalLMOutputWithCrossAttentions"),
    "llama": ("LlamaForCausalLM", "model", "CausalLMOutputWithPast"),
    "mistral": ("MistralForCausalLM", "model", "CausalLMOutputWithPast"),
    "qwen2": ("Qwen2ForCausalLM", "model", "CausalLMOutputWithPast"),
    "gemma2": ("Gemma2ForCausalLM", "model", "CausalLMOutputWithPast"),
    "phi3": ("Phi3ForCausalLM", "model", "CausalLMOutputWithPast"),
}
_OPTIONS = ("backend",)
_STATE = "_unigen_fused_loss"  # the instance attribute holding the patch's state


@dataclasses.dataclass
class _Call:
    """One forward with labels: what the head's interception needs and what it leaves."""

    labels: torch.Tensor
    shift_labels: object
    ignore_index: int
    num_items_in_batch: object
    loss: torch.Tensor | None = None  # the fused loss, once the head ran
    unfused: str | None = None  # why this call runs the model's own loss, if it does
    logits_seen: object = None  # the stand-in the loss function received


@dataclasses.dataclass
class _PatchState:
    plan: object  # hf_structure.ForwardPlan
    backend: str
    head: torch.nn.Module
    had_own_forward: bool
    original_forward: object
    head_had_own_forward: bool
    original_head_forward: object
    had_own_loss_function: bool
    original_loss_function: object
    call: _Call | None = None


def _import_transformers():
    """transformers, imported here and only here: ``unigen.kernels`` itself does not need it."""
    try:
        import transformers.loss.loss_utils  # noqa: F401  (the shared ForCausalLMLoss, >= 4.46)
        import transformers.modeling_outputs  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{OP} needs transformers >= 4.46 (pip install transformers): {exc}") from exc


def _refuse(model, reason):
    return ValueError(f"{OP}: unsupported model {type(model).__name__}: {reason}")


def read_hf_model(model):
    """The plan :func:`patch_hf_model` would use for ``model``: its head and its logit
    processing (``plan.describe()``), or a ``ValueError`` with the reason it is refused."""
    _import_transformers()
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{OP}: model must be a transformers model instance (torch.nn.Module), "
                        f"got {type(model).__name__}")
    if not isinstance(model, PreTrainedModel):
        raise _refuse(model, "not a transformers PreTrainedModel")
    state = getattr(model, _STATE, None)
    if state is not None:
        head = state.head
        loss_function = state.original_loss_function
    else:
        head = model.get_output_embeddings()
        loss_function = model.loss_function
    if not isinstance(head, torch.nn.Linear):
        raise _refuse(model, f"its output embeddings must be an nn.Linear, got {type(head).__name__}")
    owner = next(c for c in type(head).__mro__ if "forward" in vars(c))
    if owner is not torch.nn.Linear:
        raise _refuse(model, f"its output embeddings {type(head).__name__} has a forward of its own "
                             f"({owner.__qualname__}.forward), not nn.Linear's")
    if loss_function is not LOSS_MAPPING["ForCausalLM"]:
        name = getattr(loss_function, "__name__", repr(loss_function))
        raise _refuse(model, f"its loss_function is {name}, not transformers' ForCausalLMLoss "
                             f"(a custom loss_function is not replaced)")
    try:
        return read_forward(model, head)
    except Unsupported as exc:
        raise _refuse(model, str(exc)) from None


def patch_hf_model(model, **options):
    """Make ``model(..., labels=labels).loss`` use the fused linear cross-entropy (no logits).

    Args:
        model: a transformers model whose structure fits (module docstring): any causal LM or
            vision-language model whose head is an ``nn.Linear`` and whose loss is
            ``ForCausalLMLoss``; anything else raises ``ValueError`` with the reason.
        backend: the op's backend (``"auto"``: Triton on CUDA, the CPU path on CPU).

    Returns:
        ``model`` itself, patched in place. Patching again replaces the options (never wraps
        twice); :func:`unpatch_hf_model` restores the model. Patch before or after FSDP2's
        ``fully_shard`` or a tensor-parallel plan: the head's weight is read inside its own
        forward, as the setup holds it there.

    With ``labels`` the output's ``logits`` is ``None``; the loss (plus whatever the family adds
    to it), the cache, hidden states and attentions are the model's own. The loss is fp32 (as
    transformers upcasts the logits), also under ``torch.autocast``.
    """
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"{OP}: unknown option(s) {sorted(unknown)}; expected some of {list(_OPTIONS)}")
    backend = options.get("backend", "auto")
    plan = read_hf_model(model)
    if getattr(model, _STATE, None) is not None:
        unpatch_hf_model(model)
    head = model.get_output_embeddings()
    original = model.forward  # bound: the instance's own attribute or the class's method
    params = inspect.signature(original).parameters
    # Positional arguments are matched to these names (the families order them differently).
    positional = tuple(n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    state = _PatchState(plan=plan, backend=backend, head=head,
                        had_own_forward="forward" in model.__dict__, original_forward=original,
                        head_had_own_forward=False, original_head_forward=None,
                        had_own_loss_function="_loss_function" in model.__dict__,
                        original_loss_function=model.loss_function)

    @functools.wraps(original)  # keeps the signature generate() and Trainer inspect
    def forward(*args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{type(model).__name__}.forward takes at most {len(positional)} positional "
                            f"arguments, got {len(args)}")
        for name, value in zip(positional, args):  # labels may come positionally too
            if name in kwargs:
                raise TypeError(f"{type(model).__name__}.forward got multiple values for argument {name!r}")
            kwargs[name] = value
        labels = kwargs.get("labels")
        if labels is None:
            return original(**kwargs)
        if model.get_output_embeddings() is not state.head:  # replaced (resize_token_embeddings)
            _release_head(state)
            _intercept_head(model, state, model.get_output_embeddings())
        call = _Call(labels=labels, shift_labels=kwargs.get("shift_labels"),
                     ignore_index=kwargs.get("ignore_index", -100),
                     num_items_in_batch=kwargs.get("num_items_in_batch"))
        state.call = call
        try:
            out = original(**kwargs)
        finally:
            state.call = None
        if call.loss is None:  # this call took a path the op does not express: the model's own loss
            return out
        return _without_logits(out, call.logits_seen)

    def loss_function(logits=None, labels=None, vocab_size=None, num_items_in_batch=None,
                      ignore_index=-100, shift_labels=None, **kwargs):
        call = state.call
        if call is None or call.loss is None:
            return state.original_loss_function(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                                ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if (labels is not call.labels or shift_labels is not call.shift_labels
                or num_items_in_batch is not call.num_items_in_batch or ignore_index != call.ignore_index):
            raise RuntimeError(f"{OP}: {type(model).__name__}.forward called its loss with other labels or "
                               f"options than it was given; the fused loss cannot follow (unpatch the model)")
        call.logits_seen = logits
        return _LossAfterStandIn.apply(call.loss, logits)

    model.forward = forward
    model.loss_function = loss_function  # transformers' setter: the instance's _loss_function
    object.__setattr__(model, _STATE, state)  # not a submodule or parameter: plain attribute
    _intercept_head(model, state, head)
    return model


def _intercept_head(model, state, head):
    original_head_forward = head.forward
    state.head, state.original_head_forward = head, original_head_forward
    state.head_had_own_forward = "forward" in head.__dict__

    @functools.wraps(original_head_forward)
    def head_forward(hidden, *args, **kwargs):
        call = state.call
        if call is None or call.loss is not None or call.unfused is not None or args or kwargs:
            return original_head_forward(hidden, *args, **kwargs)
        params = evaluate_plan(state.plan, model, hidden.shape[:-1], head.weight.shape[0])
        if isinstance(params, str):
            call.unfused = params
            return original_head_forward(hidden)
        call.loss = _fused_loss(hidden, head, params, call, state.backend, model)
        return _stand_in(hidden, call.loss)

    head.forward = head_forward


def _release_head(state):
    head = state.head
    if state.head_had_own_forward:
        head.forward = state.original_head_forward
    elif "forward" in head.__dict__:
        del head.forward


def _fused_loss(hidden, head, params: LogitParams, call: _Call, backend, model):
    """``ForCausalLMLoss`` of the processed logits, fused."""
    weight, bias = head.weight, head.bias
    if params.vocab is not None and params.vocab < weight.shape[0]:
        if _is_dtensor(weight):
            raise ValueError(f"{OP}: {type(model).__name__} slices its vocabulary to {params.vocab} of "
                             f"{weight.shape[0]}, which a sharded head weight cannot do without a copy")
        weight = weight[:params.vocab]
        bias = bias[:params.vocab] if bias is not None else None
    scale = params.scale
    if not (isinstance(scale, (int, float)) and scale == 1):
        # a scale of the logits is the same linear with hidden·s and bias·s
        hidden = hidden * scale
        bias = bias * scale if bias is not None else None
    ignore_index = call.ignore_index
    shift_labels = call.shift_labels
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(call.labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if hidden.shape[0] != shift_labels.shape[0]:
        raise ValueError(f"{OP}: {hidden.shape[0]} positions reach the head but there are "
                         f"{shift_labels.shape[0]} labels; train with logits_to_keep=0")
    num_items = call.num_items_in_batch
    loss = fused_linear_cross_entropy(
        hidden, weight, shift_labels, bias, ignore_index=ignore_index, softcap=params.softcap,
        reduction="sum" if num_items is not None else "mean", backend=backend)
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    return loss


def _is_dtensor(x):
    return type(x).__name__ == "DTensor" or type(getattr(x, "data", None)).__name__ == "DTensor"


class _ZerosAfterLoss(torch.autograd.Function):
    """Zeros that come after ``loss`` in the graph (no value flows either way)."""

    @staticmethod
    def forward(ctx, loss, shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=loss.device)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros((), dtype=grad.dtype, device=grad.device), None, None


class _LossAfterStandIn(torch.autograd.Function):
    """``loss``, with the (processed) stand-in in its graph: its backward reaches the stand-in
    (a zero gradient) before the fused loss's own backward runs."""

    @staticmethod
    def forward(ctx, loss, stand_in):
        ctx.save_for_backward(stand_in)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        (stand_in,) = ctx.saved_tensors
        return grad, torch.zeros_like(stand_in)


def _stand_in(hidden, loss):
    """What the head returns instead of logits: ``[..., 1]`` zeros (the family's processing runs
    on it cheaply) that depend on the fused loss in the graph. A module wrapper that hooks the
    head's output — FSDP2 registers its pre-backward all-gather there, for the head and every
    module sharded with it (the final norm) — so sees its hook run before the backward of the
    loss and of everything under it, as with real logits. A DTensor for a DTensor input, as a
    tensor-parallel plan's output hook expects."""
    if _is_dtensor(hidden):
        from torch.distributed.tensor import DTensor

        local = hidden.to_local()
        zeros = _ZerosAfterLoss.apply(loss, (*local.shape[:-1], 1), local.dtype)
        return DTensor.from_local(zeros, hidden.device_mesh, hidden.placements, run_check=False)
    return _ZerosAfterLoss.apply(loss, (*hidden.shape[:-1], 1), hidden.dtype)


def _without_logits(out, stand_in):
    """The model's output with ``logits`` dropped (a ModelOutput or, with return_dict=False, a
    tuple)."""
    if isinstance(out, tuple):
        return tuple(x for x in out if x is not stand_in)
    fields = {k: v for k, v in out.items() if k != "logits"}
    return type(out)(**fields)


def unpatch_hf_model(model):
    """Restore what :func:`patch_hf_model` replaced (a no-op on an unpatched model)."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    if state.had_own_forward:
        model.forward = state.original_forward
    else:
        del model.forward  # the class's forward shows through again
    if state.had_own_loss_function:
        model.loss_function = state.original_loss_function
    else:
        del model._loss_function
    _release_head(state)
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
