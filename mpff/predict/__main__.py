"""``python -m mpff.predict ...``: the same as ``mpff predict ...``."""

import sys

from .cli import main

sys.exit(main())
