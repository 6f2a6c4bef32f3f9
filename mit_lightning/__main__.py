"""`python -m mit_lightning ...` is the `mit` command."""

from mit_lightning.cli import main

main()
