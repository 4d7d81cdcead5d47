"""patch_hf_model on every causal LM and image-text-to-text model of the installed transformers:
each family that builds from a tiny config trains patched with the unpatched loss and every
gradient, or is refused with a reason; the families the drop-in is known for must patch.

The families and the tiny builder are in ``hf_families.py`` (also the coverage report's script).
"""

import pytest

transformers = pytest.importorskip("transformers")

from .hf_families import check_family, computes_its_own_loss, family_classes  # noqa: E402

# Families the drop-in must fuse (the list and the README's), whatever else changes.
MUST_PATCH = {
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "phi", "olmo2",
    "granite", "granitemoe", "cohere", "cohere2", "mixtral", "qwen3_moe", "deepseek_v3",
    "recurrent_gemma", "nanochat", "falcon_h1", "roberta", "llava", "llava_next", "qwen2_vl",
    "qwen2_5_vl", "qwen3_vl", "gemma3", "mllama", "paligemma", "idefics3", "smolvlm",
}
# Refused, and why (the reason must say so): a loss that is not ForCausalLMLoss on the head.
MUST_REFUSE = {
    "bart": "does not call self.loss_function", "git": "labels", "blip-2": "directly",
    "idefics": "forward of its own", "musicgen": "nn.Linear",
}


@pytest.mark.parametrize("model_type,class_name", family_classes(), ids=lambda x: str(x))
def test_family_patched_or_refused(model_type, class_name):
    r = check_family(model_type, class_name)
    must_refuse = ("does not call self.loss_function" if computes_its_own_loss(model_type)
                   else MUST_REFUSE.get(model_type))
    if must_refuse:
        # (a family that needs images to run is read on the meta device: "the patch refuses it")
        assert r.status == "refused" or "the patch refuses it" in r.detail, r
        assert must_refuse in r.detail, r
        return
    if r.status == "no tiny build" and model_type not in MUST_PATCH:
        pytest.skip(f"does not build from the tiny config: {r.detail}")
    if r.status == "refused" and model_type not in MUST_PATCH:
        return  # a reason was given (the coverage report lists them)
    assert r.status == "patched", r
