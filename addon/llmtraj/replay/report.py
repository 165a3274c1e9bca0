"""The replay report: per session, calls recorded and served, rungs, misses."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

REPORT_PATH = "/llm-traj/replay-report"  # where the proxy answers the replay report


@dataclass
class SessionStats:
    recorded: int
    served: int = 0
    rungs: Counter = field(default_factory=Counter)
    misses: int = 0
    first_divergence: str | None = None
