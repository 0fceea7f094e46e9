"""`python -m mova_train.bench AREA [options]`: see mova_train/bench/__init__.py."""

import sys

from mova_train.bench import main

sys.exit(main())
