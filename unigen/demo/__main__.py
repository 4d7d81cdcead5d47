"""``python -m unigen.demo`` (``make demo``): :mod:`unigen.demo.pretrain`."""

import sys

from unigen.demo.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
