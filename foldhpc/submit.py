"""``python -m foldhpc.submit --config FILE [--set ...]``: submit a training run to Slurm."""

from foldhpc.slurm.submit import main

if __name__ == "__main__":
    raise SystemExit(main())
