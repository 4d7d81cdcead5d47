"""UniGen pre-training (paper §3.3, §4.2).

    python -m unigen.train --config configs/tiny.yaml    # a small run on the synthetic world
    python -m unigen.train --config run.yaml [--section.key=value ...]
    torchrun --nproc_per_node 8 -m unigen.train --config run.yaml

One config (:class:`unigen.pretraining.PretrainConfig`), read from YAML plus overrides and
saved, resolved, in the run folder. Each process reads its rank from torchrun's environment;
the model is replicated with DDP (or sharded with FSDP2), runs under bf16 autocast on GPUs, and
AdamW updates its trainable parameters (the frozen ViT and decoder blocks are not in the
optimizer). Rank 0 logs and writes checkpoints; SIGINT/SIGTERM save one and exit cleanly, and a
restarted run continues from it exactly (model, optimizer, schedule, RNG, data position).
The loop is the training core's (:mod:`unigen.training`); pre-training is its recipe
(:mod:`unigen.pretraining`).

In-process use (tests, the demo)::

    from unigen.train import train
    result = train(config)          # TrainResult: run_dir, model, history, ...
"""

from __future__ import annotations

import sys

from unigen.configuration import ConfigError, run_cli
from unigen.data.drops import TooManyDroppedSamples
from unigen.data.errors import DataFormatError
from unigen.pretraining import PretrainConfig, pretrain

train = pretrain


def _run(config: PretrainConfig) -> None:
    pretrain(config)  # the run's banner and end summary are the trainer's (rank 0)


def main(argv: list[str] | None = None) -> int:
    """``python -m unigen.train --config FILE [--section.key=value ...]``; returns the exit
    status (2 for a bad config or bad data: one line naming the key or the file)."""
    return run_cli(PretrainConfig, _run, argv, prog="python -m unigen.train", description=__doc__,
                   errors=(ConfigError, FileNotFoundError, DataFormatError,
                           TooManyDroppedSamples, FloatingPointError))


if __name__ == "__main__":
    sys.exit(main())
