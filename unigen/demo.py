"""`make demo`: pre-train a tiny UniGen on the embedded synthetic world (see
:mod:`unigen.demos.pretrain`). The fused-loss showcase is ``python -m unigen.demos.fused_loss``."""

import sys

from unigen.demos.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
