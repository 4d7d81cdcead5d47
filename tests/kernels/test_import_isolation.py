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
