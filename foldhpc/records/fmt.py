"""Human-readable durations, shared by every foldhpc command (light: no torch import)."""

from __future__ import annotations


def format_age(seconds: float) -> str:
    """Coarse age for tables: 45s, 12m, 5h, 3d."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def format_duration(seconds: float) -> str:
    """Precise duration for progress lines: 4m05s, 2h03m10s."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
