"""A training step reads no value back from the device (so on a GPU it never stalls the
pipeline). On CPU the step's tensor-to-Python conversions are counted with patched
``Tensor.item/tolist/__bool__/__int__/__float__/__index__``; on CUDA
``torch.cuda.set_sync_debug_mode("error")`` makes any synchronisation raise.

The kernels' CPU paths check their inputs on the host (free on CPU; on CUDA the same checks are
device-side assertions), so conversions made from inside ``unigen.kernels`` are not counted; the
CUDA case covers those."""

import os
import sys
from collections import Counter

import pytest
import torch

import unigen.kernels
from unigen.model.config import TASK_NAMES
from unigen.training.config import OptimConfig
from unigen.training.distributed import clip_grad_norm
from unigen.training.optim import build_optimizer

from .test_unigen_model import collate, make_examples, tiny_model

# the op folders (kernels/<op>/, reached through unigen.kernels.__path__) and the package surface
_KERNELS_DIRS = tuple(os.path.abspath(p) for p in unigen.kernels.__path__)
_CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


class ConversionCounter:
    """Counts tensor→Python conversions by the calling file:line (outside unigen.kernels)."""

    def __init__(self):
        self.calls = Counter()

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in _CONVERSIONS}
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def counted(t, *args, **kw):
            frame = sys._getframe(1)
            path = os.path.abspath(frame.f_code.co_filename)
            if not path.startswith(_KERNELS_DIRS):
                self.calls[f"{name} at {path}:{frame.f_lineno}"] += 1
            return fn(t, *args, **kw)
        return counted

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


def _step(model, batch, layout, generator):
    out = model(batch, generator=generator, validate=False, layout=layout)
    out.loss.backward()
    return out


def test_training_step_converts_no_tensor_to_python(tokenizers):
    """The fused configuration (the naive baselines — padded SDPA, materialised logits — check
    their inputs on the host, as the readable references they are)."""
    model = tiny_model(tokenizers)
    batch = collate(model, make_examples())
    layout = model.step_layout(batch)  # host side, before the step
    gen = torch.Generator().manual_seed(0)
    with ConversionCounter() as counter:
        out = _step(model, batch, layout, gen)
    assert not counter.calls, "host reads inside the step:\n" + "\n".join(
        f"{n} × {where}" for where, n in counter.calls.items())
    # the counts the step reports come from the layout and agree with the device's
    assert out.num_samples["match"] == 9
    assert out.num_tokens["total"] == sum(out.num_tokens[t] for t in TASK_NAMES) > 0


def test_the_counter_catches_a_conversion(tokenizers):
    """The patched conversions do count (so the test above can fail)."""
    x = torch.ones(3)
    with ConversionCounter() as counter:
        int(x.sum())
        x.tolist()
        bool(x.any())
    assert sum(counter.calls.values()) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_steps_on_cuda_do_not_synchronise(tokenizers):
    model = tiny_model(tokenizers).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [collate(model, make_examples()) for _ in range(3)]
    layouts = [model.step_layout(b) for b in batches]
    opt = build_optimizer(model, OptimConfig(), torch.device("cuda"))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(b, layout):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(b, generator=gen, validate=False, layout=layout)
        out.loss.backward()
        clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0], layouts[0])  # first call: lazy initialisation (allocator, kernels) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b, layout in zip(batches[1:], layouts[1:]):
            step(b.pin_memory(), layout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_text_encoder_mask_equals_transformers_own(implementation):
    """The ready 4-D mask (built to skip transformers' ``mask.all()`` read) gives the hidden
    states transformers computes from the 2-D padding mask."""
    from unigen.model.config import UniGenConfig
    from unigen.model.text_encoder import TextEncoder

    torch.manual_seed(0)
    enc = TextEncoder(UniGenConfig.tiny().text, 64).eval()
    enc.model.config._attn_implementation = implementation
    ids = torch.randint(5, 400, (3, 9))
    mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 6])[:, None]
    ids = ids * mask + enc.model.config.pad_token_id * ~mask
    with torch.no_grad():
        ours, _ = enc(ids, mask)
        theirs = enc.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-5, atol=1e-5)
