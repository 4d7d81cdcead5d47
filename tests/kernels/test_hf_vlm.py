"""patch_hf_model on vision-language models with images in the batch: tiny configs, pixel values
in each family's layout and its image tokens in the text, labels masking the image tokens and a
prompt. The patched loss and every gradient (vision tower and projector included) equal the
unpatched model's, and no logits are formed."""

import pytest

transformers = pytest.importorskip("transformers")

from unigen.kernels import patch_hf_model  # noqa: E402

from .hf_families import (  # noqa: E402
    build_tiny,
    compare,
    computes_its_own_loss,
    image_batch,
    loss_and_grads,
)

VLMS = [
    ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    ("qwen3_vl", "Qwen3VLForConditionalGeneration"),
    ("llava", "LlavaForConditionalGeneration"),
    ("llava_next", "LlavaNextForConditionalGeneration"),
    ("gemma3", "Gemma3ForConditionalGeneration"),
    ("mllama", "MllamaForConditionalGeneration"),
    ("paligemma", "PaliGemmaForConditionalGeneration"),
    ("idefics3", "Idefics3ForConditionalGeneration"),
    ("smolvlm", "SmolVLMForConditionalGeneration"),
]


@pytest.mark.parametrize("model_type,class_name", VLMS, ids=[v[0] for v in VLMS])
def test_vlm_with_images_same_loss_and_gradients(model_type, class_name):
    if not hasattr(transformers, class_name):
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    model = build_tiny(model_type, class_name)
    if computes_its_own_loss(model_type):
        with pytest.raises(ValueError, match="does not call self.loss_function"):
            patch_hf_model(model)
        return
    if model_type == "mllama":
        import torch

        with torch.no_grad():  # its tanh gates start closed: open them, so the image reaches the loss
            for name, p in model.named_parameters():
                if name.endswith("gate"):
                    p.fill_(0.5)
    inputs, n_image = image_batch(model_type, model)
    _, grads = loss_and_grads(model, inputs)
    parts = ("vision", "visual", "projector", "connector", "multi_modal")
    vision = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0 and any(p in n for p in parts)]
    assert vision, "the images reach the loss"
    loss_diff, grad_err, problems = compare(model, inputs)
    assert not problems, problems
    assert model(**inputs).logits is None


def test_vlm_under_bf16_autocast_within_the_house_accuracy_rule():
    import torch

    model = build_tiny("qwen2_vl", "Qwen2VLForConditionalGeneration")
    inputs, _ = image_batch("qwen2_vl", model)
    exact, exact_grads = loss_and_grads(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = loss_and_grads(model, inputs)
        patch_hf_model(model)
        out, grads = loss_and_grads(model, inputs)
    assert out.loss.dtype == torch.float32
    assert (out.loss - exact.loss).abs() <= 2 * (ref.loss - exact.loss).abs() + 1e-3
    for name, g in grads.items():
        if g is None:
            continue
        ours = (g - exact_grads[name]).abs().max()
        theirs = (ref_grads[name] - exact_grads[name]).abs().max()
        assert ours <= 2 * theirs + 1e-4, (name, ours.item(), theirs.item())
