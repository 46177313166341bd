"""`python -m pipeline.evaluate ...`: see pipeline/evaluate/run.py."""

import sys

from pipeline.evaluate.run import main

sys.exit(main())
