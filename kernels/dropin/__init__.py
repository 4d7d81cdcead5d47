"""Drop-ins for code that trains other models: transformers language models (``hf_patch``: any
causal LM or vision-language model whose structure fits, read by ``hf_structure``) and open_clip's
``ClipLoss`` contract (``clip_loss``), both on the fused ops."""
