"""``python -m knhk_memory`` is the ``knhk-memory`` command."""

import sys

from .cli import main

sys.exit(main())
