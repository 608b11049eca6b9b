"""``python -m pipelines`` is the same as ``ctseverity``."""

import sys

from pipelines.cli import main

sys.exit(main())
