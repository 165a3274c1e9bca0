"""The trajectory reader under the import path users already have
(`llmtraj.store.read_records`); the code lives in `llmtraj.core.store`."""

from .core.store import SkippedLine, TrajectoryError, read_records, trajectory_files

__all__ = ["SkippedLine", "TrajectoryError", "read_records", "trajectory_files"]
