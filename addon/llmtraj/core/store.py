"""Trajectory files: a directory of `<session>.jsonl` files, or one `.jsonl` file
for every session.

Each record is appended as one complete line in a single unbuffered write to a
file opened with O_APPEND, so concurrent sessions never interleave within a line
and a killed process leaves only whole lines behind (barring a torn write of the
very last line, which the reader reports and skips; the next writer starts on
a fresh line after it). Version 2 lines store the
request as a reference to an earlier line of the session plus what is new
(`core.chain`); the reader gives every record whole, reading a file as a stream.

A finished session file may be compressed with zstd (`<session>.jsonl.zst`,
`llm-traj compact --zstd`): every reader reads it as the plain file; a writer
that continues such a session decompresses it back to `.jsonl` first, and a
plain file beside a compressed one is the one read (it has everything).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, SupportsBytes

import zstandard
from pydantic import ValidationError
from pydantic_core import from_json, to_json

from .chain import RequestChains, SessionRequests, decode_events, encode_events
from .record import SCHEMA_VERSION, SCHEMA_VERSIONS, TEMPLATE_VALUES_VERSION, CallRecord
from .redact import SHAPE_STARTS, Scrubber, redact_raw_body, redact_url, scrubber_for
from .remote import local_trajectory
from .session import validate_session

logger = logging.getLogger("llm_traj")

_MAX_OPEN_FILES = 128
# Fields of fixed vocabulary (numbers, names the proxy chose): never scrubbed,
# so that a secret that happens to be `chat.completions` cannot rewrite `api`.
_NOT_SCRUBBED = frozenset(
    {"schema_version", "session", "index", "api", "mode", "method", "status", "stream", "complete", "timings", "tokens"}
)
# Stands for the request in the serialised line until the body is spliced in;
# NULs occur nowhere else in a record line.
_RAW_REQUEST = "\x00llm-traj:request\x00"
_RAW_REQUEST_JSON = to_json(_RAW_REQUEST)
# A bridged call's translated request (`bridge.request`) repeats the conversation
# as much as the agent's own: it is chained too, in a chain of its own per
# session (under this suffix, which no session id can contain).
_BRIDGE_CHAIN = "\x00bridge"


def private_opener(path: str, flags: int) -> int:
    """For `open(..., opener=private_opener)`: a file made 0600, for what holds conversations."""
    return os.open(path, flags, 0o600)


ZSTD = ".zst"  # appended to a compressed trajectory file's name
ZSTD_LEVEL = 9  # compact --zstd (a one-off rewrite of finished files: ratio over speed; scripts/bench --only zstd)


def is_single_file(path: Path) -> bool:
    return path.suffix == ".jsonl"


def is_compressed(file: Path) -> bool:
    return file.name.endswith(".jsonl" + ZSTD)


def _compressed_twin(file: Path) -> Path:
    return file.with_name(file.name + ZSTD)


def session_of_file(file: Path) -> str:
    """The session a directory's file holds (its name without `.jsonl` or `.jsonl.zst`)."""
    return file.name.removesuffix(ZSTD).removesuffix(".jsonl")


class TrajectoryWriter:
    def __init__(self, path: Path | str, mark_templates: Callable[[str, list[dict[str, Any]]], None] | None = None) -> None:
        self.path = Path(path)
        # For a `CallRecord` appended (compaction's, read back): marks its stream's events as the recorder
        # marks them (`recording.builder.mark_templates`), so that they are stored as compactly.
        self._mark_templates = mark_templates
        if is_compressed(self.path):
            raise ValueError(f"{self.path} is compressed (read-only); record to {self.path.name.removesuffix(ZSTD)}")
        self.single_file = is_single_file(self.path)
        # conversations are private: a directory made here is the owner's alone (files are 0600)
        os.makedirs(self.path.parent if self.single_file else self.path, mode=0o700, exist_ok=True)
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._last_index: dict[str, int] = {}
        self._files: dict[str, Path] = {}  # by session, validated
        # What this writer wrote per file, for version 2 references; bounded
        # like the open files (a file dropped here starts a fresh chain).
        self._chains: OrderedDict[Path, RequestChains] = OrderedDict()
        if self.single_file and (existing := _existing(self.path)) is not None:
            self._last_index = last_indexes(existing)

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
            existing = _existing(self.file_for(session))
            if not self.single_file and existing is not None:
                last = last_indexes(existing).get(session, 0)
        self._last_index[session] = last + 1
        return last + 1

    def append(
        self,
        record: CallRecord | dict[str, Any],
        secrets: Set[str] = frozenset(),
        request_json: bytes | SupportsBytes | None = None,
    ) -> None:
        """Append one record: a `CallRecord`, or a dict of its fields (the
        recorder's hot path, which skips validating twice). `request_json`, if
        given, is the dict's `request` as JSON text (or what gives it, by
        `bytes()`, asked only then), written as is when the request is not
        stored as a reference, is on one line and holds nothing to scrub.

        `secrets` (the call's secret header values) and credential shapes are
        scrubbed from the string values of what the line writes: a request
        stored as a reference is scrubbed only in what is new (what it refers
        to was scrubbed when its own line was written)."""
        if isinstance(record, CallRecord):
            fields = {**record.model_dump(mode="json"), "schema_version": SCHEMA_VERSION}
            if fields["events"]:  # an event's exact bytes only where they are not its text
                fields["events"] = [{k: v for k, v in e.items() if v is not None or k != "raw_base64"} for e in fields["events"]]
                if self._mark_templates is not None:
                    self._mark_templates(fields["api"], fields["events"])
        else:
            fields = record
        scrubber = scrubber_for(frozenset(secrets))
        session = fields["session"]
        file = self.file_for(session)
        fd, st = self._fd(file)
        chains = self._chains_of(file, st)
        request = fields["request"]
        line_fields = {**fields, **_redacted_places(fields, scrubber)}
        base = None
        if isinstance(request, dict):
            line_fields["request"], base = chains.encode(session, request)
            if base is not None:
                line_fields["request_base"] = base
        stored_events = None
        if events := fields.get("events"):
            near: list[str] = []
            stored_events = encode_events(events, near, SHAPE_STARTS)
            if _events_may_hold(events, near, scrubber):
                events = [{**_without_template(event), "raw": scrubber.text(event["raw"])} for event in events]
                stored_events = None
            if any(map(dict.get, events, repeat("raw_base64"))):
                events = [{**_without_template(event), "raw_base64": _scrubbed_base64(event["raw_base64"], scrubber)}
                          if event.get("raw_base64") else _without_template(event) for event in events]  # fmt: skip
                stored_events = None
            if stored_events is None:
                stored_events = encode_events(events)
            line_fields["events"] = stored_events  # of scrubbed events: nothing left to scrub
            if any(map(dict.__contains__, stored_events, repeat("v"))):
                line_fields["schema_version"] = TEMPLATE_VALUES_VERSION
        bridge = fields.get("bridge")
        bridge_request = bridge.get("request") if isinstance(bridge, dict) else None
        if isinstance(bridge_request, dict):
            stored_bridge, bridge_base = chains.encode(session + _BRIDGE_CHAIN, bridge_request)
            if bridge_base is not None:
                line_fields["bridge"] = {**bridge, "request": stored_bridge, "request_base": bridge_base}
        # (looked for line ends only here: a request stored as a reference, most of them, is not scanned)
        raw_request = False
        if request_json is not None and base is None:
            request_json = bytes(request_json)
            raw_request = b"\n" not in request_json and b"\r" not in request_json
        # The line is serialised around its events, which are scrubbed already
        # (the check for anything to scrub skips them): the fields before them,
        # the events, the fields after them.
        before, after = {}, {}
        part = before
        for key, value in line_fields.items():
            if key == "events" and stored_events is not None:
                part = after
            else:
                part[key] = value
        if raw_request:
            before["request"] = _RAW_REQUEST
        head, tail = to_json(before), to_json(after)
        if raw_request:
            head = head.replace(_RAW_REQUEST_JSON, request_json, 1)
        if scrubber.may_hold(head, foreign=raw_request) or scrubber.may_hold(tail):
            data = to_json(_scrubbed(line_fields, scrubber)) + b"\n"
        elif part is after:
            data = b"".join((head[:-1], b',"events":', to_json(stored_events), b"," if after else b"", tail[1:], b"\n"))
        else:
            data = head + b"\n"
        written = os.write(fd, data)
        while written < len(data):  # only on a full disk or a signal; finish the line
            written += os.write(fd, data[written:])
        chains.end += len(data)
        if isinstance(request, dict):  # only a line that is on disk is referred to
            chains.written(session, fields["index"], request, base and base["index"])
        if isinstance(bridge_request, dict):
            chains.written(session + _BRIDGE_CHAIN, fields["index"], bridge_request, bridge_base and bridge_base["index"])

    def _chains_of(self, file: Path, st: os.stat_result) -> RequestChains:
        """The chains of `file` (whose open file's status is `st`), fresh if
        the file is not the one they were written to (replaced, or truncated
        below what we wrote)."""
        identity = (st.st_dev, st.st_ino)
        chains = self._chains.get(file)
        if chains is None or chains.identity != identity or st.st_size < chains.end:
            chains = self._chains[file] = RequestChains(identity)
            if len(self._chains) > _MAX_OPEN_FILES:
                self._chains.popitem(last=False)
        self._chains.move_to_end(file)
        chains.end = st.st_size
        return chains

    def _fd(self, file: Path) -> tuple[int, os.stat_result]:
        """The open file of `file` and its status. A file deleted, moved away
        or replaced since it was opened (rotated by hand or by logrotate) is
        noticed here, two stats a record, and a new one opened at the path:
        the lines never go on into a file nobody can find."""
        fd = self._fds.get(file)
        if fd is not None:
            st = os.fstat(fd)
            try:
                now = os.stat(file)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                self._fds.move_to_end(file)
                return fd, st
            del self._fds[file]
            os.close(fd)
            # Its chains refer to lines of the old file (whose inode number the new one may even get): the first
            # line of the new file is whole.
            self._chains.pop(file, None)
            what = "replaced" if now is not None else "moved away" if st.st_nlink else "deleted"
            logger.warning(f"llm-traj: {file} was {what} while recording; the next calls go to a new file there")
        if len(self._fds) >= _MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        if not file.exists() and _compressed_twin(file).exists():
            _decompress(_compressed_twin(file), file)  # a compressed session continued
        try:
            fd = os.open(file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)  # read: `_end_torn_line`
        except FileNotFoundError:  # the directory was removed too: made again, the owner's alone
            os.makedirs(file.parent, mode=0o700, exist_ok=True)
            fd = os.open(file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._fds[file] = fd
        _end_torn_line(fd)
        return fd, os.fstat(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _redacted_places(fields: Mapping[str, Any], scrubber: Scrubber) -> dict[str, Any]:
    """The fields where secrets have a known place, with them replaced: the
    query of a URL (`?key=`), secret-named fields of a body kept as text; and
    the exact bytes of a body that is not UTF-8, scrubbed (out of sight of the
    check on the line's text)."""
    out: dict[str, Any] = {}
    if isinstance(url := fields.get("url"), str):
        out["url"] = redact_url(url)
    if isinstance(upstream := fields.get("upstream"), dict) and isinstance(upstream.get("url"), str):
        out["upstream"] = {**upstream, "url": redact_url(upstream["url"])}
    for name in ("request_raw", "response_raw"):
        if isinstance(text := fields.get(name), str):
            out[name] = redact_raw_body(text)
        if isinstance(data := fields.get(f"{name}_base64"), str):
            out[f"{name}_base64"] = _scrubbed_base64(data, scrubber, body=True)
    return out


def _without_template(event: dict[str, Any]) -> dict[str, Any]:
    """An event without its template's places and values (`chain.encode_events`): what they say
    of its raw is not true once the raw is scrubbed."""
    return {key: value for key, value in event.items() if key != "slots" and key != "v"}


def _events_may_hold(events: list[dict[str, Any]], near: list[str], scrubber: Scrubber) -> bool:
    """Whether any event's `raw` holds anything to scrub (`Scrubber.may_hold_text`
    of each). The call's secrets are looked for in the whole texts (a search
    that skips ahead by a secret's length). A credential shape is looked for by
    its start, which an event stored as a reference to the one before it (`p`,
    `s`) can hold only around its middle (`near`, from `encode_events`): what
    it shares with that one was searched there (by induction, the first event
    in which a start occurs has it within reach of its middle). Only when one
    is found there are the whole texts searched for shapes."""
    text = "".join(event["raw"] for event in events) if scrubber.secrets else None
    if text is not None and scrubber.holds_secret(text):
        return True
    if not scrubber.mentions_shape("".join(near)):
        return False
    return scrubber.may_hold_text(text if text is not None else "".join(event["raw"] for event in events))


def _scrubbed_base64(data: str, scrubber: Scrubber, body: bool = False) -> str:
    # as Latin-1 each byte is one character: secrets and shapes (ASCII) match byte for byte
    text = base64.b64decode(data).decode("latin-1")
    clean = scrubber.text(redact_raw_body(text) if body else text)
    return data if clean == text else base64.b64encode(clean.encode("latin-1")).decode("ascii")


def _scrubbed(line_fields: dict[str, Any], scrubber) -> dict[str, Any]:
    """The line's fields with every string scrubbed but those of fixed
    vocabulary and the events (scrubbed before they were encoded: their
    stored middles are not whole strings)."""
    out = {}
    for key, value in line_fields.items():
        if key in _NOT_SCRUBBED or key == "events":
            out[key] = value
        elif key == "request_base":  # names the request's keys, scrubbed alike
            out[key] = {
                "index": value["index"],
                "same": [scrubber.text(name) for name in value["same"]],
                "prefix": {scrubber.text(name): n for name, n in value["prefix"].items()},
            }
        else:
            out[key] = scrubber.value(value)
    return out


def _end_torn_line(fd: int) -> None:
    """Start on a fresh line after a torn last line (a writer killed in the
    middle of one): the reader then skips that one line and reads the rest."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")


class TrajectoryError(ValueError):
    """A trajectory line that cannot be read, with where it is."""

    def __init__(self, file: Path, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file, self.line = file, line


@dataclass
class SkippedLine:
    """A line a reader skipped, and why. A bad line (not a torn one) of a
    known `session` also costs that session's later lines in its file
    (`left_out`: they may refer to it, and a replay with a gap would answer
    the wrong calls)."""

    file: Path
    line: int
    message: str
    session: str | None = None
    left_out: int = 0

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: {self.message}"
        if self.session is None or self.left_out == 0:
            return where
        return f"{where}; session {self.session!r} is unreadable past it ({self.left_out} later calls left out)"


def trajectory_files(path: Path | str) -> list[Path]:
    """The files of a trajectory: a single file (FILE.jsonl, or FILE.jsonl.zst
    once compressed), or a directory's session files, plain or compressed."""
    path = Path(path)
    if is_single_file(path) or is_compressed(path):
        existing = _existing(path)
        return [existing] if existing is not None else []
    if not path.is_dir():
        return []
    names = set(os.listdir(path))  # listdir: ~15x glob's speed
    return [
        path / name for name in sorted(names)
        if name.endswith(".jsonl") or (name.endswith(".jsonl" + ZSTD) and name.removesuffix(ZSTD) not in names)
    ]  # fmt: skip


def _existing(file: Path) -> Path | None:
    """The file, else its compressed twin, if either exists."""
    if file.exists():
        return file
    twin = _compressed_twin(file)
    return twin if not is_compressed(file) and twin.exists() else None


def read_records(
    path: Path | str,
    tolerate_corrupt: bool = False,
    skipped: list[SkippedLine] | None = None,
) -> Iterator[CallRecord]:
    """Records of a trajectory file or directory, in file order, each whole
    (a version 2 request is resolved). Streams: memory holds one file's chains
    of requests, not its records. The requests of a session share the items
    they repeat (the same message objects): copy one before changing it.

    A last line without its newline that does not parse is the torn write of a
    crash, and so is a line that is only the beginning of a record (the next
    writer started on a new line after it): each is skipped (and listed in
    `skipped`). Any other bad line raises
    `TrajectoryError`, unless `tolerate_corrupt`, which skips it and the later
    lines of its session in that file (listed as one `SkippedLine`): the
    other sessions and files are read whole. A line's session is the file's
    in a directory; in a single file, its `session` field, read from the
    start of the line if the line does not parse (a line of no session is
    skipped alone). `path` may be an fsspec URL (s3://bucket/prefix), read
    from a local copy.
    """
    local = local_trajectory(path)
    single = is_single_file(local) or is_compressed(local)
    for file in trajectory_files(local):
        session = None if single else session_of_file(file)
        yield from (record for _, record in _records(file, _lines(file), tolerate_corrupt, skipped, session))


@dataclass(frozen=True)
class SessionFile:
    """Where one session's calls are: its own file (`lines` None), or the
    (line number, offset) of its lines in a file shared by every session."""

    session: str
    file: Path
    lines: tuple[tuple[int, int], ...] | None = None

    def records(
        self, tolerate_corrupt: bool = False, skipped: list[SkippedLine] | None = None
    ) -> Iterator[tuple[int, CallRecord]]:
        """((offset, length) of the line, whole record) of each call, in file order."""
        lines = _lines(self.file) if self.lines is None else _lines_at(self.file, self.lines)
        return _records(self.file, lines, tolerate_corrupt, skipped, self.session)


def trajectory_sessions(
    path: Path | str, skipped: list[SkippedLine] | None = None, tolerate_corrupt: bool = False
) -> dict[str, SessionFile]:
    """The sessions of a trajectory in the order they first appear, found
    without reading a directory's files (a file per session, named after it).
    A single file is scanned once for where each session's lines are: a line
    that does not parse is its session's still if the start of the line names
    it (and, if `tolerate_corrupt`, listed in `skipped` now, as reading that
    session lists it again); a torn last line is skipped (and listed in
    `skipped`), a line of no session raises `TrajectoryError` (unless
    `tolerate_corrupt`: skipped too)."""
    path = Path(path)
    if not (is_single_file(path) or is_compressed(path)):
        return {session_of_file(file): SessionFile(session_of_file(file), file) for file in trajectory_files(path)}
    files = trajectory_files(path)
    if not files:
        return {}
    path = files[0]
    where: dict[str, list[tuple[int, int]]] = {}
    cuts: dict[str, tuple[SkippedLine, int]] = {}  # a session's first bad line, and its lines up to it
    for number, offset, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            session = _parse_line(raw).get("session")
            if not isinstance(session, str):
                raise ValueError("invalid record: session: missing or not a string")
        except ValueError as exc:
            session = _session_named_at_start(raw)
            if session is None:
                _skip(path, number, raw, exc, tolerate_corrupt, skipped)
                continue
            if tolerate_corrupt and session not in cuts and (bad := _skip(path, number, raw, exc, True, skipped)):
                bad.session = session
                cuts[session] = bad, len(where.get(session, ())) + 1
        where.setdefault(session, []).append((number, offset))
    for session, (bad, upto) in cuts.items():
        bad.left_out = len(where[session]) - upto
    return {session: SessionFile(session, path, tuple(lines)) for session, lines in where.items()}


class TrajectoryReader:
    """A trajectory read one session at a time, for the commands that look at
    whole sessions (show, stats, diff, export): memory holds the largest
    session, not the trajectory. Iterating gives every record, session by
    session in the order they first appear; `sessions` maps each session to
    its calls by index, read when looked up."""

    def __init__(self, path: Path | str, tolerate_corrupt: bool = False, skipped: list[SkippedLine] | None = None) -> None:
        where = trajectory_sessions(local_trajectory(path), skipped, tolerate_corrupt)  # a URL: a local copy
        self.sessions = _SessionCalls(where, tolerate_corrupt, skipped)

    def __iter__(self) -> Iterator[CallRecord]:
        for calls in self.sessions.values():
            yield from calls


class _SessionCalls(Mapping[str, list[CallRecord]]):
    def __init__(self, where: dict[str, SessionFile], tolerate_corrupt: bool, skipped: list[SkippedLine] | None) -> None:
        self._where, self._tolerate_corrupt, self._skipped = where, tolerate_corrupt, skipped

    def __getitem__(self, session: str) -> list[CallRecord]:
        records = (record for _, record in self._where[session].records(self._tolerate_corrupt, self._skipped))
        return sorted(records, key=lambda r: r.index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _records(
    file: Path,
    lines: Iterable[tuple[int, int, bytes]],
    tolerate_corrupt: bool,
    skipped: list[SkippedLine] | None,
    session: str | None = None,
) -> Iterator[tuple[int, CallRecord]]:
    """The records of `lines` of `file`, whose lines are all of `session` if
    given (a directory's file), else each of the session it names. A bad line
    (tolerated) cuts its session there: its later lines are left out."""
    chains: dict[str, SessionRequests] = {}
    cut: dict[str, SkippedLine] = {}  # sessions unreadable past a bad line, by that line
    for number, offset, raw in lines:
        if not raw.strip():
            continue
        owner = session
        try:
            obj = _parse_line(raw)
            if owner is None and isinstance(obj.get("session"), str):
                owner = obj["session"]
            if owner in cut:
                cut[owner].left_out += 1
                continue
            record = _resolve(obj, chains)
        except ValueError as exc:
            owner = owner or _session_named_at_start(raw)
            if owner in cut:
                cut[owner].left_out += 1
            elif (bad := _skip(file, number, raw, exc, tolerate_corrupt, skipped)) is not None and owner is not None:
                bad.session, cut[owner] = owner, bad
            continue
        yield (offset, len(raw)), record


def _skip(
    file: Path, number: int, raw: bytes, exc: ValueError, tolerate_corrupt: bool, skipped: list[SkippedLine] | None
) -> SkippedLine | None:
    """Skip a line that cannot be read, noting it in `skipped`: a torn line
    always, any other only if `tolerate_corrupt` (else TrajectoryError).
    The note of a bad line that is not a torn one is returned."""
    torn = True
    if not raw.endswith(b"\n"):
        why = "truncated last line (torn write), skipped"
    elif _is_torn(raw):
        why = "truncated line (torn write; a later writer started on the next line), skipped"
    elif tolerate_corrupt:
        why, torn = f"{exc}, skipped", False
    else:
        raise TrajectoryError(file, number, str(exc)) from None
    note = SkippedLine(file, number, why)
    if skipped is not None:
        skipped.append(note)
    return None if torn else note


# How every writer starts a line; a line that does not parse may still say whose it is.
_LINE_START = re.compile(rb'\{\s*"schema_version"\s*:\s*\d+\s*,\s*"session"\s*:\s*"([A-Za-z0-9][A-Za-z0-9._-]{0,127})"')


def _session_named_at_start(raw: bytes) -> str | None:
    """The session named at the start of a line that does not parse, if it is written as the writers write it."""
    m = _LINE_START.match(raw)
    return m.group(1).decode("ascii") if m else None


def _is_torn(raw: bytes) -> bool:
    """A whole line that is the beginning of a JSON object and nothing else:
    cut short by a killed writer, and the next writer started on a fresh line."""
    text = raw.rstrip(b"\r\n")
    if not text.startswith(b"{"):
        return False
    try:
        from_json(text)
    except ValueError as exc:
        return str(exc).startswith("EOF while parsing")
    return False


class LineReader:
    """Reads the record of one line again, by where it is, keeping the files
    it read last open (replay reads a line per call it serves)."""

    def __init__(self, max_open: int = 64, max_decompressed: int = 4) -> None:
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._max_open = max_open
        # compressed files read last, decompressed (no reading at an offset in them)
        self._decompressed: OrderedDict[Path, bytes] = OrderedDict()
        self._max_decompressed = max_decompressed

    def record(self, file: Path, span: tuple[int, int]) -> CallRecord:
        """The record of the line at `span` (offset, length), with the request
        as stored (for what does not need it whole: the response)."""
        if is_compressed(file):
            return _resolve(_parse_line(self._decompressed_bytes(file)[span[0] : span[0] + span[1]]), None)
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
            if len(self._fds) > self._max_open:
                os.close(self._fds.popitem(last=False)[1])
        self._fds.move_to_end(file)
        return _resolve(_parse_line(os.pread(fd, span[1], span[0])), None)

    def _decompressed_bytes(self, file: Path) -> bytes:
        data = self._decompressed.get(file)
        if data is None:
            with _open_lines(file) as fh:
                data = self._decompressed[file] = fh.read()
            if len(self._decompressed) > self._max_decompressed:
                self._decompressed.popitem(last=False)
        self._decompressed.move_to_end(file)
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._decompressed.clear()


def last_indexes(file: Path) -> dict[str, int]:
    """The last call index of each session in a file (bad lines skipped),
    without resolving or validating records."""
    last: dict[str, int] = {}
    for _, _, raw in _lines(file):
        try:
            obj = from_json(raw)
            session, index = obj["session"], obj["index"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(session, str) and isinstance(index, int):
            last[session] = max(last.get(session, 0), index)
    return last


def written_calls(file: Path) -> set[tuple[str, int, float]]:
    """(session, index, start time) of every call in a file (bad lines
    skipped), without resolving or validating records: what a restarted
    writer checks a call it is sent again against."""
    calls: set[tuple[str, int, float]] = set()
    for _, _, raw in _lines(file):
        try:
            obj = from_json(raw)
            calls.add((obj["session"], obj["index"], obj["timings"]["started_at"]))
        except (ValueError, KeyError, TypeError):
            continue
    return calls


def _open_lines(file: Path) -> io.BufferedReader:
    """A file for reading, decompressed as it is read if it is compressed."""
    if is_compressed(file):
        return io.BufferedReader(zstandard.open(file, "rb"), 1 << 16)
    return open(file, "rb")


def _lines(file: Path) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, offset, bytes with the newline) of each line
    (offsets in the decompressed text of a compressed file)."""
    with _open_lines(file) as fh:
        offset = number = 0
        while raw := fh.readline():
            while not raw.endswith(b"\n") and (more := fh.readline()):
                raw += more  # the file grew as it was read: the same line, being written
            number += 1
            yield number, offset, raw
            if not raw.endswith(b"\n"):
                return  # the file's end as read: what comes after is the rest of this line, not another
            offset += len(raw)


def _lines_at(file: Path, where: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, bytes]]:
    """The lines at (number, offset) `where`, in file order."""
    if is_compressed(file):  # no seeking: read through, keeping the lines asked for
        wanted = dict(where)
        yield from ((n, offset, raw) for n, offset, raw in _lines(file) if wanted.get(n) == offset)
        return
    with open(file, "rb") as fh:
        for number, offset in where:
            fh.seek(offset)
            yield number, offset, fh.readline()


def _compress(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        zstandard.ZstdCompressor(level=ZSTD_LEVEL).copy_stream(src, dst)


def _decompress(source: Path, target: Path) -> None:
    """Writes `target` whole (renamed into place), then removes `source`."""
    work = target.with_name(f".{target.name}.decompressing")
    with _open_lines(source) as src, open(work, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.chmod(work, 0o600)
    os.replace(work, target)
    source.unlink()


def _parse_line(raw: bytes) -> dict[str, Any]:
    try:
        obj = from_json(raw)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    version = obj.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        raise ValueError(
            f"schema_version {version!r} is not supported (this llm-traj reads {', '.join(map(str, SCHEMA_VERSIONS))})"
        )
    return obj


def _resolve(obj: dict[str, Any], chains: dict[str, SessionRequests] | None) -> CallRecord:
    """The record of a parsed line, whole; without `chains`, a request stored
    as a reference is left out."""
    bridge = obj.get("bridge") if isinstance(obj.get("bridge"), dict) else {}
    if chains is None:
        if obj.pop("request_base", None) is not None:
            obj["request"] = None
        if bridge.pop("request_base", None) is not None:
            bridge["request"] = None
    elif obj["schema_version"] >= 2 and isinstance(obj.get("session"), str) and isinstance(obj.get("index"), int):
        requests = chains.get(obj["session"])
        if requests is None:
            requests = chains[obj["session"]] = SessionRequests()
        obj["request"] = requests.add(obj["index"], obj.get("request"), obj.pop("request_base", None))
        if isinstance(bridge.get("request"), dict):
            bridged = chains.setdefault(obj["session"] + _BRIDGE_CHAIN, SessionRequests())
            bridge["request"] = bridged.add(obj["index"], bridge["request"], bridge.pop("request_base", None))
    if obj["schema_version"] >= 2:
        obj["events"] = decode_events(obj.get("events"))
    return _validate(obj)


def _validate(obj: dict[str, Any]) -> CallRecord:
    try:
        return CallRecord.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise ValueError(f"invalid record: {where}: {first['msg']}") from None


class CompactionError(ValueError):
    """A file that could not be rewritten, in one line."""


def compact_file(
    file: Path, compress: bool = False, mark_templates: Callable[[str, list[dict[str, Any]]], None] | None = None
) -> tuple[Path, int, int, list[SkippedLine]]:
    """Rewrite one trajectory file in the current format, in place (a new file
    renamed over it), compressed with zstd if `compress` or if it was, its
    streams' events marked by `mark_templates` (see `TrajectoryWriter`):
    (the file now, bytes before, bytes after, torn last line skipped). A
    compressed file replaces the plain one. A bad line raises
    `TrajectoryError` and leaves the file as it was; so does a file that grew
    meanwhile (a recorder still writing to it)."""
    before = file.stat().st_size
    compress = compress or is_compressed(file)
    target = _compressed_twin(file) if compress and not is_compressed(file) else file
    skipped: list[SkippedLine] = []
    work = Path(tempfile.mkdtemp(prefix=".llm-traj-compact-", dir=file.parent))
    try:
        new = work / "compacted.jsonl"
        writer = TrajectoryWriter(new, mark_templates)
        try:
            for record in read_records(file, skipped=skipped):
                writer.append(record)
        finally:
            writer.close()
        if file.stat().st_size != before:
            raise CompactionError(f"{file} changed while it was compacted (still being recorded?); left as it was")
        if not new.exists():
            new.write_bytes(b"")  # nothing readable in it: only a torn line
        if compress:
            _compress(new, new.with_name(new.name + ZSTD))
            new = new.with_name(new.name + ZSTD)
        os.chmod(new, 0o600)
        after = new.stat().st_size
        os.replace(new, target)
        if target != file:
            file.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target, before, after, skipped
