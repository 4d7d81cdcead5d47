"""``python -m unigen.finetune``: fine-tuning on an IGLUE task (:mod:`unigen.iglue.finetune`)."""

import sys

from unigen.iglue.finetune import main

if __name__ == "__main__":
    sys.exit(main())
