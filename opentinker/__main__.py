"""``python -m opentinker``: the same as the ``opentinker`` command."""

import sys

from opentinker.cli import main

sys.exit(main())
