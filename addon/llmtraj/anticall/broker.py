"""Hands held agent calls to drivers and their answers back (anti-call mode).

One asyncio loop owns the broker (mitmproxy's); the agent side (the addon),
the control API and the ROCK file channel all call it from there, so nothing
here locks. Calls are numbered per session from 1, as ROCK numbers them, and
named `<session>:<index>`.

    call = broker.open_call(session, api, request, stream)   # agent side
    piece = await broker.next_piece(call)                     # Final | Delta | Finish | Failure
    event = await broker.next_event(session, timeout)         # driver side
    broker.respond(call_id, completion) / delta / finish / fail

A call is live until it is answered (a full response, an error, or the finish
of a stream) or released (the agent hung up, the hold timed out, its session
ended, the proxy stopped); then only its outcome is kept. Pushing a full
answer again to an answered call is ignored (idempotent); pushing to a
released one is refused with the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..apis import ApiShape
from ..apis.base import StreamBuilder
from .models import CallInfo, Event, SessionInfo

ANSWERED = "answered"
AGENT_HUNG_UP = "the agent hung up"
SHUTTING_DOWN = "the proxy is shutting down"


class BrokerError(Exception):
    status = 400
    code = "bad_request"


class UnknownCall(BrokerError):
    status, code = 404, "unknown_call"


class CallConflict(BrokerError):
    status, code = 409, "conflict"


class CallGone(BrokerError):
    status, code = 410, "call_gone"


class SessionEnded(BrokerError):
    status, code = 410, "session_ended"


class ShuttingDown(BrokerError):
    status, code = 503, "shutting_down"


class BadDelta(BrokerError):
    status, code = 400, "bad_delta"


# --- what the agent side gets, in order ---------------------------------------


@dataclass(frozen=True, slots=True)
class Final:
    response: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Delta:
    delta: dict[str, Any]
    index: int = 0
    finish_reason: str | None = None
    logprobs: Any = None
    data: bytes = b""  # the stream event(s) it became, made when it was pushed


@dataclass(frozen=True, slots=True)
class Finish:
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    status: int
    message: str
    type: str = "server_error"
    code: str | None = None


Piece = Final | Delta | Finish | Failure


@dataclass(eq=False, slots=True)
class Call:
    id: str
    session: str
    index: int
    api: ApiShape
    request: Any
    stream: bool
    created_at: float
    state: str = "pending"
    extra: dict[str, Any] = field(default_factory=dict)  # what drivers attach for the trajectory
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued: _Queued | None = None  # its request event, while undelivered
    # The answer's stream, made from the deltas as they are pushed (so that a
    # delta the API cannot carry is refused to the driver who pushed it).
    builder: StreamBuilder | None = None

    def info(self) -> CallInfo:
        return CallInfo(
            id=self.id, session=self.session, index=self.index, api=self.api.name, stream=self.stream,
            state=self.state, created_at=self.created_at,
        )  # fmt: skip

    def event(self) -> Event:
        return Event(
            type="request", session=self.session, id=self.id, index=self.index, api=self.api.name,
            stream=self.stream, request=self.request, created_at=self.created_at,
        )  # fmt: skip


@dataclass(eq=False, slots=True)
class _Queued:
    """An event waiting in a session's queue and in the queue of all sessions;
    whichever driver takes it first gets it."""

    event: Event
    call: Call | None = None
    taken: bool = False


@dataclass(eq=False, slots=True)
class _Session:
    id: str
    created_at: float
    next_index: int = 1
    live: dict[int, Call] = field(default_factory=dict)
    outcomes: dict[int, str] = field(default_factory=dict)  # finished calls: how they ended
    events: deque[_Queued] = field(default_factory=deque)
    ended_at: float | None = None
    end_reason: str | None = None

    def info(self) -> SessionInfo:
        return SessionInfo(
            id=self.id, state="ended" if self.ended_at else "active", calls=self.next_index - 1,
            held=len(self.live), created_at=self.created_at, ended_at=self.ended_at, end_reason=self.end_reason,
        )  # fmt: skip


class Listener(Protocol):
    """Follows calls and sessions as they come (the ROCK file channel)."""

    def call_opened(self, call: Call) -> None: ...

    def session_ended(self, session: str) -> None: ...


def call_id(session: str, index: int) -> str:
    return f"{session}:{index}"


class Broker:
    def __init__(self, hold_timeout: float = 0.0) -> None:
        self.hold_timeout = hold_timeout  # seconds a call waits for each piece; 0: no limit
        self.listeners: list[Listener] = []
        self._sessions: dict[str, _Session] = {}
        self._calls: dict[str, Call] = {}  # live calls by id
        self._all_events: deque[_Queued] = deque()
        self._changed = asyncio.Event()
        self._stopping = False

    # --- agent side -----------------------------------------------------------

    def open_call(self, session: str, api: ApiShape, request: Any, stream: bool) -> Call:
        """Hold a new call of `session` for the drivers."""
        if self._stopping:
            raise ShuttingDown("llm-traj: the proxy is shutting down")
        s = self._session(session)
        if s.ended_at is not None:
            raise SessionEnded(
                f"llm-traj: session {session!r} has ended ({s.end_reason}); calls of an ended session are "
                "refused: use a new session id"
            )
        index = s.next_index
        s.next_index += 1
        call = Call(call_id(session, index), session, index, api, request, stream, time.time())
        s.live[index] = call
        self._calls[call.id] = call
        call.queued = self._queue(s, call.event(), call)
        for listener in self.listeners:
            listener.call_opened(call)
        return call

    async def next_piece(self, call: Call) -> Piece:
        """The next piece of the answer; a `Failure` when the hold timed out or
        the call was released."""
        if call.pieces.empty() and self.hold_timeout > 0 and self._calls.get(call.id) is call:
            try:
                async with asyncio.timeout(self.hold_timeout):
                    return await call.pieces.get()
            except TimeoutError:
                reason = f"no driver answer within the hold timeout ({self.hold_timeout:g} s)"
                self._release(call, f"timed out: {reason}", Failure(504, f"llm-traj: {reason}", "timeout", "hold_timeout"))
        return await call.pieces.get()

    def release(self, call_id: str, reason: str = AGENT_HUNG_UP) -> None:
        """The agent is gone (hung up): drop its call and tell the drivers."""
        call = self._calls.get(call_id)
        if call is not None:
            self._release(call, reason, Failure(499, f"llm-traj: {reason}", "client_closed", "client_closed"))

    def shutdown(self) -> None:
        """Answer every held call with a 503 and refuse new ones."""
        self._stopping = True
        for call in list(self._calls.values()):
            self._release(call, SHUTTING_DOWN, Failure(503, f"llm-traj: {SHUTTING_DOWN}", "server_error", "shutting_down"))

    # --- driver side: getting work -------------------------------------------

    async def next_event(self, session: str | None = None, timeout: float = 30.0) -> Event | None:
        """The next event of `session` (of any session if None), waiting up to
        `timeout` seconds; None if nothing came. A session that has ended
        answers `session_end` once its queue is empty, as often as asked."""
        return await self._wait(lambda: self._take(session), timeout)

    async def wait_call(self, session: str, index: int, timeout: float = 30.0) -> Event | None:
        """Call `index` of `session` once it exists (ROCK's `pop_request`), or
        `session_end` if the session ends first; None after `timeout`."""

        def ready() -> Event | None:
            s = self._sessions.get(session)
            if s is None:
                return None
            call = s.live.get(index)
            if call is not None:
                self._deliver(call)
                return call.event()
            if s.ended_at is not None:
                return self._session_end(s)
            if index in s.outcomes:
                raise CallGone(f"call {call_id(session, index)} is no longer held: {s.outcomes[index]}")
            return None

        return await self._wait(ready, timeout)

    async def _wait(self, ready, timeout: float) -> Event | None:
        deadline = asyncio.get_running_loop().time() + max(0.0, timeout)
        while True:
            changed = self._changed
            event = ready()
            if event is not None:
                return event
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()
            except TimeoutError:
                return ready()

    def _take(self, session: str | None) -> Event | None:
        s = None
        if session is None:
            queue = self._all_events
        else:
            s = self._sessions.get(session)
            if s is None:
                return None
            queue = s.events
        while queue:
            queued = queue.popleft()
            if queued.taken:
                continue  # through the other queue, or its call is gone
            queued.taken = True
            if queued.call is not None:
                self._deliver(queued.call)
            return queued.event
        if s is not None and s.ended_at is not None:
            return self._session_end(s)
        return None

    @staticmethod
    def _deliver(call: Call) -> None:
        if call.queued is not None:
            call.queued.taken = True
            call.queued = None
        if call.state == "pending":
            call.state = "delivered"

    # --- driver side: answering ------------------------------------------------

    def call(self, call_id: str) -> Call:
        """A live call; `UnknownCall` / `CallGone` otherwise, and for an
        answered call `CallConflict` (which the full-answer pushes take as a
        duplicate)."""
        call = self._calls.get(call_id)
        if call is not None:
            return call
        session, _, index = call_id.rpartition(":")
        s = self._sessions.get(session)
        outcome = s.outcomes.get(int(index)) if s is not None and index.isdigit() else None
        if outcome is None:
            raise UnknownCall(f"no call {call_id!r}: ids are <session>:<index>, from 1")
        if outcome == ANSWERED:
            raise CallConflict(f"call {call_id} was already answered")
        raise CallGone(f"call {call_id} is no longer held: {outcome}")

    def respond(self, call_id: str, response: dict[str, Any], extra: dict[str, Any] | None = None) -> bool:
        """Answer with a full response. False if it was already answered (ignored)."""
        return self._answer(call_id, Final(response), extra)

    def fail(self, call_id: str, failure: Failure, extra: dict[str, Any] | None = None) -> bool:
        """Answer with an error (mid-stream: an error event). False if already answered."""
        return self._answer(call_id, failure, extra)

    def finish(self, call_id: str, finish: Finish, extra: dict[str, Any] | None = None) -> bool:
        """End a streamed answer. False if already answered."""
        return self._answer(call_id, finish, extra)

    def delta(self, call_id: str, delta: Delta, extra: dict[str, Any] | None = None) -> None:
        """Stream a delta; BadDelta when the call's API cannot carry it (the call is unchanged)."""
        call = self.call(call_id)
        if call.builder is None:
            call.builder = call.api.new_stream(call.request)
        try:
            data = call.builder.delta(delta.delta, index=delta.index, finish_reason=delta.finish_reason,
                                      logprobs=delta.logprobs)  # fmt: skip
        except ValueError as exc:
            raise BadDelta(f"the delta does not fit this {call.api.name} call: {exc}") from None
        delta = replace(delta, data=data)
        call.state = "streaming"
        self._deliver(call)
        call.extra.update(extra or {})
        call.pieces.put_nowait(delta)

    def _answer(self, call_id: str, piece: Piece, extra: dict[str, Any] | None) -> bool:
        try:
            call = self.call(call_id)
        except CallConflict:
            return False
        if isinstance(piece, Final) and call.state == "streaming":
            raise CallConflict(f"call {call_id} is streaming: push more deltas, then finish it")
        call.extra.update(extra or {})
        self._release(call, ANSWERED, piece)
        return True

    # --- sessions --------------------------------------------------------------

    def end_session(self, session: str, reason: str = "ended by a driver") -> SessionInfo:
        """End a session (idempotent): its held calls are answered with a 410,
        drivers get `session_end`, and its later calls are refused."""
        s = self._session(session)
        if s.ended_at is None:
            s.ended_at, s.end_reason = time.time(), reason
            for call in list(s.live.values()):
                message = f"llm-traj: session {session!r} ended ({reason})"
                self._release(call, f"session ended ({reason})", Failure(410, message, "invalid_request_error", "session_ended"))
            self._queue(s, self._session_end(s), broadcast=True)
            for listener in self.listeners:
                listener.session_ended(session)
        return s.info()

    def sessions(self) -> list[SessionInfo]:
        return [s.info() for s in self._sessions.values()]

    def held(self, session: str | None = None) -> list[CallInfo]:
        calls: Iterable[Call] = self._calls.values()
        if session is not None:
            s = self._sessions.get(session)
            calls = s.live.values() if s is not None else ()
        return [call.info() for call in calls]

    def has_held(self, session: str) -> bool:
        s = self._sessions.get(session)
        return s is not None and bool(s.live)

    # --- internals -----------------------------------------------------------

    def _session(self, session: str) -> _Session:
        s = self._sessions.get(session)
        if s is None:
            s = self._sessions[session] = _Session(session, time.time())
        return s

    def _queue(self, s: _Session, event: Event, call: Call | None = None, broadcast: bool = False) -> _Queued:
        """Queue an event for the drivers of `s` and those of any session: one
        of them gets it, or with `broadcast` one of each."""
        queued = _Queued(event, call)
        for queue in (s.events, self._all_events):
            while queue and queue[0].taken:
                queue.popleft()  # nobody polls this queue (a file-only driver): drop what is stale
            queue.append(queued)
            if broadcast:
                queued = _Queued(event, call)
        self._notify()
        return queued

    def _release(self, call: Call, outcome: str, piece: Piece) -> None:
        """End a live call: the agent side gets `piece`, drivers that had the
        call get a `cancelled` event unless it was answered."""
        s = self._sessions[call.session]
        del self._calls[call.id]
        del s.live[call.index]
        s.outcomes[call.index] = outcome
        delivered = call.queued is None
        if not delivered:  # no driver will see its request now
            call.queued.taken = True
            call.queued = None
        call.pieces.put_nowait(piece)
        if outcome != ANSWERED and delivered and s.ended_at is None:
            self._queue(s, Event(type="cancelled", session=call.session, id=call.id, index=call.index, reason=outcome))
        else:
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @staticmethod
    def _session_end(s: _Session) -> Event:
        return Event(type="session_end", session=s.id, reason=s.end_reason)
