"""``python -m gpfm_train ...``: the ``gpfm-train`` command where its script is not installed."""

import sys

from gpfm_train.cli import main

sys.exit(main())
