"""``python -m foldhpc.submit --config FILE [--set ...]``: submit a training run to Slurm."""

import sys

from foldhpc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["submit", *sys.argv[1:]]))
