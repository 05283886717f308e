"""`python -m p2pz_directions.cli`."""

import sys

from p2pz_directions.cli import main

sys.exit(main())
