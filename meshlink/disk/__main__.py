"""``python -m meshlink.disk serve ...`` / ``info ...``."""

import sys

from ..cli.disk import main

sys.exit(main())
