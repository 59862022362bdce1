"""The training loop and what it needs: schedule, RNG state, exit codes."""
