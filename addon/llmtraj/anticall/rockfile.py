"""ROCK's file channel (alibaba/ROCK `model-service`, driven by ROLL's
`anti-call-llm` client), so a ROCK driver can answer the held calls unchanged.

One log file per session; lines appended by both sides:

    LLM_REQUEST_START<request JSON>LLM_REQUEST_END{"timestamp": <ms>, "index": <n>}     (proxy)
    LLM_RESPONSE_START<response JSON>LLM_RESPONSE_END{"timestamp": <ms>, "index": <n>}  (driver)
    SESSION_END                                                                          (proxy)

Calls are numbered per session from 1. ROCK's reader splits lines and
markers naively, so the proxy writes each request on one line that cannot
be misread: JSON with every non-ASCII character escaped (no raw newline or
Unicode line separator can appear) and the marker words escaped inside
strings (`LLM_` as `\\u004cLM_`, `SESSION_END` as `\\u0053ESSION_END`), which
still decodes to the same request. Responses are read by marker, not by
line, so a driver's pretty-printed JSON (raw newlines) or a marker word
inside a string does not break them; a response whose JSON is invalid is
answered to the agent as a 502 rather than leaving it waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .broker import Broker, BrokerError, Call, Failure, call_id

logger = logging.getLogger("llm_traj")

REQUEST_START, REQUEST_END = b"LLM_REQUEST_START", b"LLM_REQUEST_END"
RESPONSE_START, RESPONSE_END = b"LLM_RESPONSE_START", b"LLM_RESPONSE_END"
SESSION_END = b"SESSION_END"
POLL_INTERVAL = 0.02  # seconds between looks at a file with held calls


def encode_payload(obj: Any) -> bytes:
    """JSON on one line in which no marker appears (decodes to `obj`)."""
    text = json.dumps(obj, ensure_ascii=True)
    # Outside strings JSON has no letters but true/false/null, so these words
    # can only be inside strings, where a \\u escape means the same letter.
    return text.replace("LLM_", "\\u004cLM_").replace("SESSION_END", "\\u0053ESSION_END").encode()


def _meta(index: int) -> bytes:
    return json.dumps({"timestamp": int(time.time() * 1000), "index": index}).encode()


def request_line(request: Any, index: int) -> bytes:
    return REQUEST_START + encode_payload(request) + REQUEST_END + _meta(index) + b"\n"


@dataclass
class ParsedResponse:
    index: int
    response: Any = None
    problem: str | None = None  # the payload was not JSON


class ResponseReader:
    """Finds the response records in what is appended to a log file, fed as it
    grows; request lines and SESSION_END are skipped."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[ParsedResponse]:
        buf = self._buf
        buf += data
        found: list[ParsedResponse] = []
        while True:
            start = buf.find(RESPONSE_START)
            if start < 0:
                del buf[: max(0, len(buf) - len(RESPONSE_START) + 1)]  # keep a marker's possible beginning
                return found
            parsed, end = self._record(buf, start + len(RESPONSE_START))
            if parsed is None:
                del buf[:start]
                return found  # incomplete: wait for more
            found.append(parsed)
            del buf[:end]

    @staticmethod
    def _record(buf: bytearray, payload_start: int) -> tuple[ParsedResponse | None, int]:
        """The record whose payload starts at `payload_start`: the first
        LLM_RESPONSE_END followed by a meta line with an index, preferring one
        whose payload is valid JSON (a marker word may sit inside the payload)."""
        invalid: tuple[ParsedResponse, int] | None = None
        end = buf.find(RESPONSE_END, payload_start)
        while end >= 0:
            newline = buf.find(b"\n", end)
            if newline < 0:
                break
            index = _index(buf[end + len(RESPONSE_END) : newline])
            if index is not None:
                try:
                    return ParsedResponse(index, json.loads(buf[payload_start:end])), newline + 1
                except ValueError as exc:
                    invalid = invalid or (ParsedResponse(index, problem=f"not valid JSON ({exc})"), newline + 1)
            end = buf.find(RESPONSE_END, end + 1)
        else:
            return invalid or (None, 0)
        return None, 0  # the line is still being written


def _index(meta: bytes) -> int | None:
    try:
        index = json.loads(meta).get("index")
    except (ValueError, AttributeError):
        return None
    return index if isinstance(index, int) and not isinstance(index, bool) else None


@dataclass
class _File:
    path: Path
    offset: int = 0
    reader: ResponseReader = field(default_factory=ResponseReader)


class RockFileChannel:
    """Writes the calls of its sessions to their log files and pushes the
    responses found there to the broker (a broker listener).

    `template` is the log file's path; `{session}` in it is replaced by the
    session id, else the file serves `default_session` only."""

    def __init__(self, broker: Broker, template: str, default_session: str) -> None:
        self.broker = broker
        self.template = template
        self.default_session = default_session
        self._files: dict[str, _File] = {}
        self._task: asyncio.Task | None = None

    def path_for(self, session: str) -> Path | None:
        if "{session}" in self.template:
            return Path(self.template.replace("{session}", session)).expanduser()
        return Path(self.template).expanduser() if session == self.default_session else None

    def start(self) -> None:
        self.broker.listeners.append(self)
        self._task = asyncio.ensure_future(self._poll())

    def close(self) -> None:
        if self in self.broker.listeners:
            self.broker.listeners.remove(self)
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # --- broker listener -------------------------------------------------------

    def call_opened(self, call: Call) -> None:
        f = self._file(call.session)
        if f is not None:
            self._append(f, request_line(call.request, call.index))

    def session_ended(self, session: str) -> None:
        f = self._file(session)
        if f is not None:
            self._append(f, SESSION_END + b"\n")

    # --- files -------------------------------------------------------------------

    def _file(self, session: str) -> _File | None:
        f = self._files.get(session)
        if f is None:
            path = self.path_for(session)
            if path is None:
                return None
            # A session starts a fresh file: ROCK's driver reads the last request line.
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            f = self._files[session] = _File(path)
        return f

    @staticmethod
    def _append(f: _File, line: bytes) -> None:
        try:
            fd = os.open(f.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:
            logger.error(f"llm-traj: cannot write the ROCK log {f.path}: {exc}")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            for session, f in list(self._files.items()):
                if self.broker.has_held(session):
                    self._read(session, f)

    def _read(self, session: str, f: _File) -> None:
        try:
            with open(f.path, "rb") as fh:
                fh.seek(f.offset)
                data = fh.read()
        except OSError as exc:
            logger.error(f"llm-traj: cannot read the ROCK log {f.path}: {exc}")
            return
        f.offset += len(data)
        for parsed in f.reader.feed(data):
            self._push(session, parsed)

    def _push(self, session: str, parsed: ParsedResponse) -> None:
        cid = call_id(session, parsed.index)
        try:
            if parsed.problem is not None:
                message = f"llm-traj: the driver's response to call {cid} in {self._files[session].path} is {parsed.problem}"
                logger.warning(message)
                self.broker.fail(cid, Failure(502, message, "proxy_error", "bad_driver_response"))
            elif isinstance(parsed.response, dict):
                self.broker.respond(cid, parsed.response)
            elif isinstance(parsed.response, str):
                call = self.broker.call(cid)
                self.broker.respond(cid, call.api.completion_from_text(call.request, parsed.response))
            else:
                message = f"llm-traj: the driver's response to call {cid} is not a JSON object"
                self.broker.fail(cid, Failure(502, message, "proxy_error", "bad_driver_response"))
        except BrokerError as exc:
            if exc.status != 409:  # 409: answered already, a repeated line
                logger.warning(f"llm-traj: ROCK log {self._files[session].path}: {exc}")
