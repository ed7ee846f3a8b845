"""``python -m surgeon`` (what ``torchrun -m surgeon finetune ...`` runs)."""

from surgeon.cli import main

main()
