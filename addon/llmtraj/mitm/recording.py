"""Record mode: forward every LLM call untouched, stream it chunk by chunk and
tee a copy of the bytes into a `CallTee`, then append the record."""

from __future__ import annotations

import logging
from pathlib import Path

from mitmproxy import http

from ..recorder import CallTee, RecordFields
from ..store import TrajectoryWriter
from .options import LlmTrajOptions
from .routing import CALL_KEY, llm_call, str_headers

logger = logging.getLogger("llm_traj")


def error_kind(flow: http.HTTPFlow) -> str:
    message = flow.error.msg.lower() if flow.error else ""
    if "client" in message:
        return "client_disconnected"
    if flow.response is None and not flow.server_conn.timestamp_tcp_setup:
        return "upstream_unreachable"
    return "upstream_disconnected"


RECORDING_MODES = ("record", "anticall")



class Recorder:
    """Tees LLM calls into the trajectory: every call in record and anti-call
    mode (there the "upstream" is the driver behind the loopback server), and in
    any mode a call another addon marked with `"record": True` in its
    `flow.metadata["llm_traj"]` (replay's forward-and-record on a miss).
    What another addon puts under `"extra"` there is stored in the record's
    `extra` (an anti-call driver's token ids, for instance), never sent."""

    def __init__(self, options: LlmTrajOptions) -> None:
        self._options = options
        self._writer: TrajectoryWriter | None = None
        self._tees: dict[str, CallTee] = {}  # by flow id, while the call is in flight
        # Where marked calls go in a mode that records only those (replay, whose
        # llm_traj_path is what it reads); set by that mode's addon, which
        # configures before this one.
        self.marked_path: Path | None = None

    def configure(self, updated: set[str]) -> None:
        settings = self._options.settings
        path = None
        if settings is not None:
            path = settings.path if settings.mode in RECORDING_MODES else self.marked_path
        if self._writer is not None and self._writer.path != path:
            self._writer.close()
            self._writer = None
        if path is not None and self._writer is None:
            self._writer = TrajectoryWriter(path)
            logger.info(f"llm-traj: recording to {path}")

    def request(self, flow: http.HTTPFlow) -> None:
        call = llm_call(flow)
        if self._writer is None or call is None or flow.response is not None:
            return
        mode = self._options.settings.mode
        if mode not in RECORDING_MODES and not flow.metadata[CALL_KEY].get("record"):
            return
        request = flow.request
        index = self._writer.next_index(call.session)
        flow.metadata[CALL_KEY]["index"] = index
        self._tees[flow.id] = CallTee(
            api=call.api,
            session=call.session,
            index=index,
            mode=mode,
            method=request.method,
            url=request.url,
            request_headers=str_headers(request.headers),
            request_body=(request.get_content(strict=False) if "content-encoding" in request.headers else request.raw_content) or b"",
            started_at=request.timestamp_start,
        )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        tee = self._tees.get(flow.id)
        if tee is None:
            return
        response = flow.response
        tee.response_started(response.status_code, str_headers(response.headers), now=response.timestamp_start)

        # Every response streams, JSON too: nothing is held back from the agent,
        # and mitmproxy's streaming path costs less than buffering the body.
        def tee_chunk(data: bytes) -> bytes:
            tee.chunk(data)
            return data

        response.stream = tee_chunk

    def response(self, flow: http.HTTPFlow) -> None:
        tee = self._tees.pop(flow.id, None)
        if tee is not None:
            self._write(flow, tee, tee.finish())

    def error(self, flow: http.HTTPFlow) -> None:
        tee = self._tees.pop(flow.id, None)
        if tee is not None:
            message = flow.error.msg if flow.error else "unknown error"
            self._write(flow, tee, tee.fail(error_kind(flow), message))

    def _write(self, flow: http.HTTPFlow, tee: CallTee, record: RecordFields) -> None:
        record["extra"].update(flow.metadata[CALL_KEY].get("extra") or {})
        try:
            self._writer.append(record, tee.secrets, tee.request_json)
        except OSError as exc:  # the agent already has its answer; say loudly what was lost
            logger.error(f"llm-traj: could not write {record['session']} #{record['index']}: {exc}")

    def done(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
