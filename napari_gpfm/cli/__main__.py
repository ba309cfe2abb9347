import sys

from napari_gpfm.cli import main

sys.exit(main())
