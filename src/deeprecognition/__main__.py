"""`python -m deeprecognition ...`, the form `ray job submit -- ...` runs on a cluster."""

import sys

from deeprecognition.cli import main

sys.exit(main())
