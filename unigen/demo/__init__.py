"""The demos: ``python -m unigen.demo`` (``make demo``) pre-trains a tiny UniGen on the embedded
synthetic world (:mod:`unigen.demo.pretrain`); ``python -m unigen.demo.fused_loss`` shows the
fused cross-entropy against the naive one on a tiny LM head."""
