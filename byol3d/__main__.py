"""``python -m byol3d`` runs the command line (also under ``torchrun``)."""

import sys

from byol3d.cli import main

sys.exit(main())
