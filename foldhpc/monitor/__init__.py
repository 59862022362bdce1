"""Progress reporting: log files, the machine-readable status file, TensorBoard."""
