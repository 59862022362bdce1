"""Helpers for tests that run Debian's real Prometheus and node_exporter (tests/prometheus/servers.py)."""
