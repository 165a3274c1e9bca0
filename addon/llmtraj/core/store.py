"""Trajectory files: a directory of `<session>.jsonl` files, or one `.jsonl` file
for every session.

Each record is appended as one complete line in a single unbuffered write to a
file opened with O_APPEND, so concurrent sessions never interleave within a line
and a killed process leaves only whole lines behind (barring a torn write of the
very last line, which the reader reports and skips).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json, to_json

from .record import SCHEMA_VERSION, CallRecord
from .redact import REDACTED
from .session import validate_session

_MAX_OPEN_FILES = 128
REDACTED_BYTES = REDACTED.encode()
# Stands for the request in the serialised line until the body is spliced in;
# NULs occur nowhere else in a record line.
_RAW_REQUEST = "\x00llm-traj:request\x00"
_RAW_REQUEST_JSON = to_json(_RAW_REQUEST)


def is_single_file(path: Path) -> bool:
    return path.suffix == ".jsonl"


class TrajectoryWriter:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.single_file = is_single_file(self.path)
        if self.single_file:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._last_index: dict[str, int] = {}
        self._files: dict[str, Path] = {}  # by session, validated
        if self.single_file and self.path.exists():
            for record in read_records(self.path, tolerate_corrupt=True):
                self._last_index[record.session] = max(self._last_index.get(record.session, 0), record.index)

    def file_for(self, session: str) -> Path:
        file = self._files.get(session)
        if file is None:
            validate_session(session)
            file = self._files[session] = self.path if self.single_file else self.path / f"{session}.jsonl"
        return file

    def next_index(self, session: str) -> int:
        """Reserve the next call index of a session (continuing an existing file)."""
        last = self._last_index.get(session)
        if last is None:
            last = 0
            file = self.file_for(session)
            if not self.single_file and file.exists():
                last = max((r.index for r in read_records(file, tolerate_corrupt=True)), default=0)
        self._last_index[session] = last + 1
        return last + 1

    def append(
        self,
        record: CallRecord | dict[str, Any],
        secrets: Set[str] = frozenset(),
        request_json: bytes | None = None,
    ) -> None:
        """Append one record: a `CallRecord`, or a dict of its fields (the
        recorder's hot path, which skips validating twice). `request_json`, if
        given, is the dict's `request` as JSON text, written as is."""
        if isinstance(record, CallRecord):
            line = record.model_dump_json().encode()
            session = record.session
        else:
            session = record["session"]
            if request_json is None:
                line = to_json(record)
            else:
                line = to_json({**record, "request": _RAW_REQUEST}).replace(_RAW_REQUEST_JSON, request_json, 1)
        for secret in secrets:  # scrubbed in the serialised line: secrets echoed anywhere go too
            line = line.replace(secret.encode(), REDACTED_BYTES)
        data = line + b"\n"
        fd = self._fd(self.file_for(session))
        written = os.write(fd, data)
        while written < len(data):  # only on a full disk or a signal; finish the line
            written += os.write(fd, data[written:])

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            self._fds.move_to_end(file)
            return fd
        if len(self._fds) >= _MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        fd = self._fds[file] = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class TrajectoryError(ValueError):
    """A trajectory line that cannot be read, with where it is."""

    def __init__(self, file: Path, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file, self.line = file, line


@dataclass
class SkippedLine:
    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def trajectory_files(path: Path | str) -> list[Path]:
    path = Path(path)
    if is_single_file(path):
        return [path] if path.exists() else []
    return sorted(path.glob("*.jsonl")) if path.is_dir() else []


def read_records(
    path: Path | str,
    tolerate_corrupt: bool = False,
    skipped: list[SkippedLine] | None = None,
) -> Iterator[CallRecord]:
    """Records of a trajectory file or directory, in file order.

    A last line without its newline that does not parse is the torn write of a
    crash: it is skipped (and listed in `skipped`). Any other bad line raises
    `TrajectoryError`, unless `tolerate_corrupt`, which skips it too.
    """
    for file in trajectory_files(path):
        with open(file, "rb") as fh:
            lines = fh.read().split(b"\n")
        last = len(lines) - 1
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = _parse_line(raw)
            except ValueError as exc:
                torn = number - 1 == last  # no newline after it
                if not (torn or tolerate_corrupt):
                    raise TrajectoryError(file, number, str(exc)) from None
                if skipped is not None:
                    why = "truncated last line (torn write), skipped" if torn else f"{exc}, skipped"
                    skipped.append(SkippedLine(file, number, why))
                continue
            yield record


def _parse_line(raw: bytes) -> CallRecord:
    try:
        obj = from_json(raw)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"schema_version {version!r} is not supported (this llm-traj reads {SCHEMA_VERSION})")
    try:
        return CallRecord.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise ValueError(f"invalid record: {where}: {first['msg']}") from None
