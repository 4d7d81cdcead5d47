"""Drop-ins for code that trains other models: transformers causal LMs (``hf_patch``) and
open_clip's ``ClipLoss`` contract (``clip_loss``), both on the fused ops."""
