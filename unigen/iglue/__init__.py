"""IGLUE (paper §4.2–4.3): the task files' readers, image resolution, fine-tuning (a recipe on
the training core), scoring, the benchmark's protocol, the few-shot runner and Table 1, in one
place. Entry points: ``python -m unigen.finetune``, ``python -m unigen.evaluate``, ``python -m
unigen.iglue.fewshot`` and ``python -m unigen.iglue.table``."""
