"""``python -m unigen.evaluate``: scoring on IGLUE test files (:mod:`unigen.iglue.evaluate`)."""

import sys

from unigen.iglue.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
