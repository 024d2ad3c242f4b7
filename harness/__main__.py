"""``python -m harness`` (and so ``torchrun -m harness train ...``)."""

from harness.cli import entry

entry()
