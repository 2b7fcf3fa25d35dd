"""``python -m unorm.conformance`` (``unorm conformance``): see :mod:`unorm.conformance.cli`."""

import sys

from .cli import main

sys.exit(main())
