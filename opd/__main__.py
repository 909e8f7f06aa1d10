"""`python -m opd ...` (what `torchrun -m opd distill CONFIG` runs on every rank): the `opd` command."""

import sys

from opd.cli.main import main

sys.exit(main())
