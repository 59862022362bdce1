"""Surviving what is not a preemption: supervisor and heartbeat, non-finite guard, run-directory lock."""
