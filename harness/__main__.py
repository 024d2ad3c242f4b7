"""``python -m harness`` (and so ``torchrun -m harness train ...``)."""

import sys

from harness.cli import main

sys.exit(main())
