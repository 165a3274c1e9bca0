"""llm-traj: record, replay and take over the LLM calls of any agent.

The public Python names: the trajectory record (`CallRecord`), its reader
(`read_records`) and the anti-call driver's client (`AntiCallClient`). The
mitmproxy addon is `addon/llm_traj.py`; the command is `llm-traj`.
"""

from .anticall.client import AntiCallClient, AntiCallError
from .core.record import CallRecord
from .core.store import TrajectoryError, read_records

__all__ = ["AntiCallClient", "AntiCallError", "CallRecord", "TrajectoryError", "read_records"]
