"""`python -m opd.cli ...` (how torchrun launches ranks) is the `opd` command."""

from opd.cli import app

app()
