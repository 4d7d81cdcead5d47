"""``unigen.kernels`` is installable for op users alone: importing it (the drop-in API included)
pulls in none of the model/data dependencies; transformers is imported when a model is patched."""

import subprocess
import sys

CHECK = """
import sys
sys.modules["transformers"] = None  # as if it were not installed: importing it raises
import unigen.kernels
from unigen.kernels import ClipLoss, fused_linear_cross_entropy, patch_hf_model
heavy = sorted(m for m in sys.modules if m.split(".")[0] in
               ("accelerate", "open_clip", "sentencepiece", "tokenizers", "PIL", "yaml", "safetensors")
               or m.startswith(("unigen.model", "unigen.data", "unigen.training")))
assert not heavy, heavy
try:
    patch_hf_model(object())
except ImportError as exc:  # a clear error at patch time, not at import
    assert "transformers" in str(exc), exc
else:
    raise AssertionError("patch_hf_model without transformers did not raise")
print("isolated")
"""


def test_import_unigen_kernels_needs_no_model_dependencies():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "isolated" in proc.stdout, proc.stdout + proc.stderr


NO_TRITON = """
import sys
sys.modules["triton"] = None  # as if it were not installed
import torch
import unigen.kernels as k
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None
                and (m.endswith(".triton_kernels") or m.split(".")[0] == "triton"))
assert not loaded, loaded
h, w = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
t = torch.randint(0, 11, (5,))
k.fused_linear_cross_entropy(h, w, t).backward()
k.fused_linear_cross_entropy(h, w, t, reduction="none").sum().backward()
k.contrastive_loss(torch.randn(6, 4, requires_grad=True), torch.randn(6, 4), 10.0).loss.backward()
q = torch.randn(7, 2, 8, requires_grad=True)
cu, prefix = torch.tensor([0, 3, 7]), torch.tensor([1, 2])
k.prefix_lm_attention(q, q, q, cu, prefix, max_seqlen=4).sum().backward()
try:
    k.prefix_lm_attention(q, q, q, cu, prefix, max_seqlen=4, backend="triton")
except RuntimeError as exc:
    assert "needs the triton package" in str(exc), exc
else:
    raise AssertionError("backend='triton' without triton did not raise")
print("no triton needed")
"""


def test_import_unigen_kernels_needs_no_triton():
    """Each op's Triton kernels live in its ``triton_kernels.py``, which its launchers import only
    where triton is installed: without triton, ``unigen.kernels`` imports and every op runs on its
    PyTorch paths."""
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "no triton needed" in proc.stdout, proc.stdout + proc.stderr
