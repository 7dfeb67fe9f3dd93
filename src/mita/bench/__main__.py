"""``python -m mita.bench``."""

import sys

from .cli import main

sys.exit(main())
