"""``python -m mita <command>`` (also what ``torchrun -m mita train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
