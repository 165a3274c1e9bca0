"""The control file: how a driver finds the control API (its URL and token) of
the proxy working on a trajectory path, and a trainer the token of the proxy's
own endpoints (in every mode). The proxy writes it when it starts (and its
control API listens) and removes it when it stops; drivers read it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from ..core.store import is_single_file
from .models import ControlInfo


class ControlFileError(Exception):
    """The control file is missing (`code` no_control_file) or unreadable (bad_control_file)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def control_file_for(traj: Path) -> Path:
    """Where the proxy writes the control file for a trajectory path."""
    return Path(f"{traj}.control.json") if is_single_file(traj) else traj / "control.json"


def write_control_file(path: Path, info: ControlInfo) -> None:
    """Write the control file atomically, readable only by its owner (it holds the token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, info.model_dump_json(indent=2).encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_control_file(path: Path | str) -> ControlInfo:
    path = Path(path)
    try:
        return ControlInfo.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ControlFileError("no_control_file", f"{path} does not exist: is the proxy running?") from None
    except (OSError, ValidationError) as exc:
        raise ControlFileError("bad_control_file", f"cannot read the control file {path}: {exc}") from None


def remove_control_file(path: Path, token: str) -> None:
    """Remove the control file if it is still ours (not a newer proxy's, which has another token)."""
    try:
        if read_control_file(path).token == token:
            path.unlink()
    except (ControlFileError, OSError):
        pass
