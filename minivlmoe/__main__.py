"""``python -m minivlmoe`` entry point (see minivlmoe/cli.py).

Like the ``minivlmoe`` console script (``minivlmoe.cli:main``), it loads no NumPy before
``cli.main`` has chosen the BLAS threads (minivlmoe/threads.py).
"""

import sys

from .cli import main

sys.exit(main())
