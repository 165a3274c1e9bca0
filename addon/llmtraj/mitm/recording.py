"""Record mode: forward every LLM call untouched, streamed chunk by chunk, and
hand a capture of it to the record writer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy.mode_specs import ReverseMode

from ..apis import API_BY_NAME
from ..core.headers import RawHeaders, content_length, header
from ..core.store import TrajectoryWriter
from ..recording.capture import CallCapture
from ..recording.sink import RecordSink
from ..upstreams.config import NO_UPSTREAM
from .loopback import ORIGINAL_URL_KEY
from .options import LlmTrajOptions
from .routing import CALL_KEY, CallMetadata

logger = logging.getLogger("llm_traj")


def error_kind(flow: http.HTTPFlow) -> str:
    """Which side ended the call, from the connections (the message alone
    cannot tell: "peer closed connection without sending complete message
    body" is what HTTP/1 says of either side). mitmproxy marks a connection
    whose peer closed it as no longer readable before the error hook runs."""
    message = flow.error.msg.lower() if flow.error else ""
    if "client" in message or not flow.client_conn.state & ConnectionState.CAN_READ:
        return "client_disconnected"
    if flow.response is None and not flow.server_conn.timestamp_tcp_setup:
        return "upstream_unreachable"
    return "upstream_disconnected"


def flow_failure(flow: http.HTTPFlow) -> tuple[str, str]:
    """(the record's error kind, message) of an LLM call that ended with an
    error: the upstream failure a part noted (a timeout it applied), else told
    from the connections."""
    noted = flow.metadata[CALL_KEY].get("upstream_failure")
    if noted is not None:
        return noted["kind"], noted["message"]
    return error_kind(flow), flow.error.msg if flow.error else "unknown error"


RECORDING_MODES = ("record", "anticall")


def _stream_ends(flow: http.HTTPFlow, headers: RawHeaders) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """How a call's stream ends for its agent (`headers`: its response's, raw),
    when mitmproxy forwards the call to its upstream: its API's final events'
    first lines and their endings (`ApiShape.final_endings`); none for any other
    call. (An answer the addon produces through the loopback server is handed
    over at its end: parts of its record, such as a bridged call's upstream
    side, are complete only then.)"""
    info = flow.metadata.get(CALL_KEY)
    if info is None or ORIGINAL_URL_KEY in flow.metadata:
        return (), ()
    if not (header(headers, b"content-type") or b"").lower().startswith(b"text/event-stream"):
        return (), ()
    shape = API_BY_NAME[info["api"]]
    return shape.final_events, shape.final_endings


def _ends_with_final_event(data: bytes, final_events: tuple[bytes, ...]) -> bool:
    """Whether a chunk ends with a whole final event (its first line at a line start)."""
    if not data.endswith(b"\n\n"):
        return False
    for event in final_events:
        at = data.rfind(event)
        if at == 0 or (at > 0 and data[at - 1] == 10):  # (10: a line feed)
            return True
    return False


_NO_UPSTREAM = urlsplit(NO_UPSTREAM)


def _meant_url(flow: http.HTTPFlow, mode: str) -> str:
    """Where the agent meant its call to go: the reverse target, unless that
    is the placeholder of a proxy given no upstream (`llm-traj run --mode
    anticall`); then the base URL the agent was given, the proxy's (session
    prefix removed)."""
    request, client = flow.request, flow.client_conn
    if (
        mode != "anticall" or not isinstance(client.proxy_mode, ReverseMode) or not client.sockname
        or (request.host, request.port) != (_NO_UPSTREAM.hostname, _NO_UPSTREAM.port)
    ):
        return request.url
    host, port = client.sockname[:2]  # the proxy's address as the agent reached it (mitmproxy rewrote Host)
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if client.tls_established else 'http'}://{host}:{port}{request.path}"


class Recorder:
    """Records LLM calls: every call in record and anti-call mode (there the
    "upstream" is the driver behind the loopback server), and in any mode a
    call another addon marked with `"record": True` in its
    `flow.metadata["llm_traj"]` (replay's forward-and-record on a miss).
    What another addon puts under `"extra"` there is stored in the record's
    `extra` (an anti-call driver's token ids, for instance), never sent.

    On the event loop it only captures (the bytes as they stream past, and
    when); the record is made and written by the `RecordSink` child process."""

    def __init__(self, options: LlmTrajOptions) -> None:
        self._options = options
        self._indexes: TrajectoryWriter | None = None  # numbers the calls (continuing existing files)
        self._sink: RecordSink | None = None
        self._captures: dict[str, CallCapture] = {}  # by flow id, while the call is in flight
        self._request_parts: dict[str, list[bytes]] = {}  # by flow id, while a request body streams
        # Where marked calls go in a mode that records only those (replay, whose
        # llm_traj_path is what it reads); set by that mode's addon, which
        # configures before this one.
        self.marked_path: Path | None = None
        # The registry calls are tagged from (set by `Prompting`), asked when the
        # writer starts: a configure can run inside another one, before `Prompting`'s.
        self.prompts_path: Callable[[], str | None] = lambda: None  # a file, or mlflow:TRACKING_URI
        # The upstream side of a bridged call (set by `UpstreamForwarding`), taken when the call ends.
        self.bridged: Callable[[str], dict | None] = lambda flow_id: None

    def configure(self, updated: set[str]) -> None:
        settings = self._options.settings
        path = None
        if settings is not None:
            path = settings.path if settings.mode in RECORDING_MODES else self.marked_path
        prompts = self.prompts_path()
        if self._sink is not None and (self._sink.path, self._sink.prompts) != (path, prompts):
            self._close()
        if path is not None and self._sink is None:
            self._indexes = TrajectoryWriter(path)
            self._sink = RecordSink(path, prompts)
            self._sink.start()  # ready (imports done) before the first call ends
            logger.info(f"llm-traj: recording to {path}")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # In record mode the request body streams upstream too, collected on the
        # way (buffering it costs the proxy more); the other modes need it whole
        # in `request`, and so does a content-encoded body (decoded there).
        info = flow.metadata.get(CALL_KEY)
        settings = self._options.settings
        if (
            self._sink is None or info is None or flow.response is not None or settings.mode != "record"
            or settings.needs_whole_request or "prompt" in info  # a prompt override rewrites it
            or header(flow.request.headers.fields, b"content-encoding") is not None
        ):
            return
        self._capture(flow, info, "record", b"")
        parts = self._request_parts[flow.id] = []

        def collect(data: bytes) -> bytes:
            if data:
                parts.append(data)
            return data

        flow.request.stream = collect

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._request_parts:
            self._captures[flow.id].request_body = self._request_parts.pop(flow.id)  # (not joined: a copy)
            return
        info = flow.metadata.get(CALL_KEY)
        if self._sink is None or info is None or flow.response is not None:
            return
        mode = self._options.settings.mode
        if mode not in RECORDING_MODES and not info.get("record"):
            return
        request = flow.request
        encoded = header(request.headers.fields, b"content-encoding") is not None
        body = request.get_content(strict=False) if encoded else request.raw_content
        self._capture(flow, info, mode, body or b"")

    def _capture(self, flow: http.HTTPFlow, info: CallMetadata, mode: str, body: bytes) -> None:
        request = flow.request
        session = info["session"]
        index = info["index"] = self._indexes.next_index(session)
        self._captures[flow.id] = CallCapture(
            api=info["api"],
            session=session,
            index=index,
            mode=mode,
            method=request.method,
            url=_meant_url(flow, mode),
            request_headers=list(request.headers.fields),
            request_body=body,
            started_at=request.timestamp_start,
        )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        capture = self._captures.get(flow.id)
        if capture is None:
            return
        response = flow.response
        capture.status = response.status_code
        capture.response_headers = list(response.headers.fields)
        capture.response_headers_at = response.timestamp_start
        response.stream = self._capturing(flow, capture)

    def stream_through(self, flow: http.HTTPFlow, passing: Callable[[bytes], bytes]) -> bool:
        """Has the response's stream function hand each chunk, once captured, to
        `passing`, which returns what the agent gets instead (b"" for nothing
        yet): one call a chunk, where a function wrapped around the stream
        function costs two. False when this recorder does not capture the flow."""
        capture = self._captures.get(flow.id)
        if capture is None or capture.status is None:
            return False
        flow.response.stream = self._capturing(flow, capture, passing)
        return True

    def _capturing(
        self, flow: http.HTTPFlow, capture: CallCapture, passing: Callable[[bytes], bytes] | None = None
    ) -> Callable[[bytes], bytes | tuple[()]]:
        chunks, times = capture.chunks, capture.chunk_times
        headers = capture.response_headers  # as the upstream sent them
        length = content_length(headers)
        received = 0
        final_events, final_endings = _stream_ends(flow, headers)

        # Every response streams, JSON too: nothing is held back from the agent,
        # and mitmproxy's streaming path costs less than buffering the body.
        # The capture goes into the writer's pipe before the agent can tell the
        # response is over: for a body of known length with its last byte,
        # before that byte is passed on; for a chunked body or HTTP/2 at the end
        # of the body (b""), whose end marker is sent after this; for a stream,
        # also as soon as a chunk ends with its API's final event, at which SDKs
        # stop reading (whatever might follow that event is then not recorded).
        # A chunk is searched for that event only when it begins with one, or
        # ends as one does: on the proxy's loop a search of every chunk cost a
        # streamed event more than a microsecond (a final event in a chunk after
        # others, with data of its own, then goes at the end of the body).
        def capture_chunk(data: bytes) -> bytes | tuple[()]:
            nonlocal received
            if data:
                chunks.append(data)
                times.append(time.time())
                if length is not None:
                    received += len(data)
                    if received >= length:
                        self._send(flow, None)
                elif final_events and (
                    data.startswith(final_events) or (final_endings and data.endswith(final_endings))
                ) and _ends_with_final_event(data, final_events):
                    self._send(flow, None)
            else:
                self._send(flow, None)
            if passing is None:
                return data
            return passing(data) or ()  # never b"" for a piece: in a chunked response that is the end

        return capture_chunk

    def response(self, flow: http.HTTPFlow) -> None:
        self._send(flow, None)  # (sent at the end of the body already, unless it had none)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._captures:
            self._send(flow, flow_failure(flow))

    def _send(self, flow: http.HTTPFlow, error: tuple[str, str] | None) -> None:
        capture = self._captures.pop(flow.id, None)
        if capture is None:
            return
        if (parts := self._request_parts.pop(flow.id, None)) is not None:
            capture.request_body = parts  # ended before the whole request was sent
        capture.ended_at = time.time()
        info: CallMetadata = flow.metadata[CALL_KEY]
        if (noted := info.get("upstream_failure")) is not None:
            # llm-traj's own client gave up on the upstream (the flow itself ended
            # normally, with the proxy's error), or a timeout the addon applied
            error = noted["kind"], noted["message"]
            if not noted["answered"]:  # no response came: what the agent got was the proxy's error
                capture.status, capture.response_headers, capture.response_headers_at = None, [], None
                capture.chunks, capture.chunk_times = [], []
        capture.error = error
        capture.extra = info.get("extra") or {}
        capture.upstream = info.get("upstream")
        capture.prompt = info.get("prompt")
        if "sampling" in info and capture.upstream is not None:  # the route's sampling control
            capture.upstream = {**capture.upstream, "sampling": info["sampling"]}
        capture.token_capture = info.get("capture")
        capture.weight_version = info.get("weight_version")
        capture.bridge = self.bridged(flow.id)
        self._sink.send(capture)

    async def written(self, session: str, timeout: float) -> bool:
        """Wait until every call of `session` handed to the writer so far is
        written (a call is handed over before its agent has the end of its
        answer); False if that took longer than `timeout` seconds."""
        return True if self._sink is None else await self._sink.wait_written(session, timeout)

    def _close(self) -> None:
        if self._sink is not None:
            self._sink.close()
        self._sink = self._indexes = None

    def done(self) -> None:
        self._close()
