"""``python -m ssam_tune.export``: see :mod:`ssam_tune.export.cli`."""

import sys

from ssam_tune.export.cli import main

sys.exit(main())
