"""``python -m unigen.training.export CHECKPOINT OUT_DIR``: a training checkpoint's model as a
``UniGen.from_pretrained`` folder, from either checkpoint format (a sharded one is read in this
one process, whatever number of processes wrote it).

A checkpoint resumes only with the number of processes that wrote it; to go on with another
number, export its model and start a new run from it::

    python -m unigen.training.export runs/r1/checkpoints/step_00001000 runs/r1-step1000
    python -m unigen.train --config runs/r1/config.yaml --init.from_pretrained=runs/r1-step1000 \\
        --run.output_dir=runs/r2
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import argparse

    from unigen.configuration import print_error
    from unigen.model.pretrained import CheckpointError
    from unigen.version import add_version_argument

    prog = "python -m unigen.training.export"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder (<run>/checkpoints/step_<N>)")
    parser.add_argument("out_dir", help="the model folder to write (new, or empty)")
    add_version_argument(parser, prog)
    args = parser.parse_args(argv)
    from unigen.training.checkpointing import export_model

    try:
        out = export_model(args.checkpoint, args.out_dir)
    except (CheckpointError, FileExistsError, OSError) as e:
        print_error(prog, e)
        return 2
    print(f"[unigen.training.export] {args.checkpoint} → {out} "
          f"(UniGen.from_pretrained; start a run from it with --init.from_pretrained={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
