"""``python -m minivlmoe`` entry point (see minivlmoe/cli.py)."""

import sys

from .cli import main

sys.exit(main())
