"""``python -m meshlink.cli ...`` runs the ``meshlink`` command."""

import sys

from . import main

sys.exit(main())
