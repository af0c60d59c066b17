"""``python -m peftkit.cli``."""

import sys

from . import main

sys.exit(main())
