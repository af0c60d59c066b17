"""``python -m peftkit.cli``."""

import sys

from peftkit.cli import main

sys.exit(main())
