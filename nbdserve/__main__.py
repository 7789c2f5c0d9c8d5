"""``python -m nbdserve``: the same as the ``nbdserve`` command."""

import sys

from .cli import main

sys.exit(main())
