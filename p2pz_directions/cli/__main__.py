"""`python -m p2pz_directions.cli`."""

from p2pz_directions.cli import entry

entry()
