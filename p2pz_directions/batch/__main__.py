"""``python -m p2pz_directions.batch ARGS`` = ``p2pz batch ARGS``; what ``accelerate launch -m`` runs in
every process."""

from __future__ import annotations

import sys

from p2pz_directions.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
