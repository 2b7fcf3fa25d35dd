"""``python -m unorm`` is the ``unorm`` command."""

import sys

from .cli import main

sys.exit(main())
