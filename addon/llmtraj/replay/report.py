"""The replay report: per session, calls recorded and served, rungs, the
normalisation rules that made calls match, nearest matches, misses."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

REPORT_PATH = "/llm-traj/replay-report"  # where the proxy answers the replay report


@dataclass
class SessionStats:
    recorded: int
    served: int = 0
    rungs: Counter = field(default_factory=Counter)
    rules: Counter = field(default_factory=Counter)  # "<preset>:<rule>" -> calls it helped match
    nearest: list[dict[str, Any]] = field(default_factory=list)  # {step, score, differences} per nearest match
    misses: int = 0
    first_divergence: str | None = None
    unreadable: str | None = None  # the bad line its recording stops at (its calls past it cannot be replayed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "recorded": self.recorded,
            "served": self.served,
            "unserved": self.recorded - self.served,
            "rungs": dict(self.rungs),
            "rules": dict(self.rules),
            "nearest": self.nearest,
            "misses": self.misses,
            "first_divergence": self.first_divergence,
            "unreadable": self.unreadable,
        }


def report_lines(
    sessions: dict[str, dict[str, Any]], calls: int, not_asked: int = 0, skipped: list[str] | None = None
) -> list[str]:
    """The report in words: a total, then a line per session (and one per
    nearest match), then one per line of the recording skipped."""
    served = sum(s["served"] for s in sessions.values())
    misses = sum(s["misses"] for s in sessions.values())
    more = f" ({not_asked} more recorded, never asked for)" if not_asked else ""
    lines = [f"replay report: {served} of {calls} recorded calls served, {misses} misses, {len(sessions)} sessions{more}"]
    for name, s in sessions.items():
        rungs = ", ".join(f"{r} {n}" for r, n in s["rungs"].items())
        line = f"  {name}: {s['served']}/{s['recorded']} served" + (f" ({rungs})" if rungs else "")
        line += f", {s['misses']} misses"
        if s["rules"]:
            line += "; rules: " + ", ".join(f"{r} {n}" for r, n in sorted(s["rules"].items()))
        if s["first_divergence"]:
            line += f"; first: {s['first_divergence']}"
        if s.get("unreadable") and s["unreadable"] not in (s["first_divergence"] or ""):
            line += f"; unreadable from {s['unreadable']}"
        lines.append(line)
        for match in s["nearest"]:
            lines.append(f"    step {match['step']} served as nearest (similarity {match['score']:.3f}): "
                         + "; ".join(match["differences"]))  # fmt: skip
    lines.extend(f"  skipped {line}" for line in skipped or ())
    return lines
