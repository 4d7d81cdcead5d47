"""IGLUE (paper §4.2–4.3): the task files' readers, image resolution, fine-tuning (a recipe on
the training core) and scoring, in one place. Entry points: ``python -m unigen.finetune`` and
``python -m unigen.evaluate``."""
