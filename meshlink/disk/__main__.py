"""``python -m meshlink.disk serve ...`` / ``info ...``."""

import sys

from .cli import main

sys.exit(main())
