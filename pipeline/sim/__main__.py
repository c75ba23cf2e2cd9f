"""``python -m pipeline.sim up sim-arm64 sim-x86``: the sim CLI without the main edgeship CLI."""

import sys

from pipeline.cli import run
from pipeline.sim.cli import app

if __name__ == "__main__":
    sys.exit(run(app, prog_name="python -m pipeline.sim"))
