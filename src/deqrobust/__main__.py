"""``python -m deqrobust`` = the ``deqrobust`` command."""

import sys

from .cli.main import main

sys.exit(main())
