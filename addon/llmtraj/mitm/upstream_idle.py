"""The upstream idle limit (`llm_traj_upstream_idle_timeout`) for the calls
mitmproxy forwards itself (llm-traj's own client applies it to the others, as a
route's first-byte and idle timeouts).

mitmproxy 11 offers no such limit per request: only its connection idle limit
(600 s; `tcp_timeout` in 12), which closes the agent's connection without an
answer and leaves a record blaming the agent. So while a call waits for its
upstream, that limit is disarmed for the agent's connection and this one
applies: a call whose upstream sent nothing for the limit (no response head,
or no body piece) has its upstream connection closed; the agent gets a 504 in
its API's shape (or, mid-stream, its connection closed as the upstream's would
be) and the record says `upstream_timeout`. Per body piece only a time is
stored; one timer checks the calls when the first limit could have passed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from mitmproxy import http

from .connections import close_server_connection, disarm_idle_timeout
from .loopback import ORIGINAL_URL_KEY
from .options import LlmTrajOptions
from .routing import CALL_KEY

logger = logging.getLogger("llm_traj")


class _Watch:
    """One call watched (a plain class with slots: one is made for every call forwarded)."""

    __slots__ = ("flow", "limit", "rearm", "last", "given_up")

    def __init__(self, flow: http.HTTPFlow, limit: float, rearm: Callable[[], object]) -> None:
        self.flow = flow
        self.limit = limit
        self.rearm = rearm  # re-arms mitmproxy's own idle limit, disarmed until the call ends
        self.last = time.monotonic()  # when the upstream last sent something
        self.given_up = False  # its upstream connection closed for the limit


def _touching(watch: _Watch, passing):
    """A body's stream function that also notes when each piece passed."""

    def touch(data: bytes) -> bytes | list[bytes]:
        watch.last = time.monotonic()
        return passing(data)

    return touch


class UpstreamIdleTimeout:
    def __init__(self, options: LlmTrajOptions) -> None:
        self._options = options
        self._watches: dict[str, _Watch] = {}  # by flow id, while the call waits for its upstream
        # One timer for all the calls watched, at the first time one of them
        # could reach its limit (a timer per call cost every call a heap entry
        # and its cancelling): each check looks at every call watched then.
        self._timer: asyncio.TimerHandle | None = None
        self._due = math.inf  # when the timer fires (time.monotonic())

    # (It serves every flow, whatever the limit: a call watched when the limit is
    # set to 0 at runtime must still have its watch ended.)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A request body that streams upstream (record mode) is on its way while
        # mitmproxy connects and sends it: the `request` hook comes only once it
        # is sent, so the watch starts here, and each piece of it counts.
        if callable(flow.request.stream) and CALL_KEY in flow.metadata and (limit := self._limit()) is not None:
            watch = self._watch(flow, limit)
            flow.request.stream = _touching(watch, flow.request.stream)

    def request(self, flow: http.HTTPFlow) -> None:
        # (last of the parts: the call goes upstream unless one answered it or
        # gave it to the loopback server, whose producers apply their own limits)
        if (watch := self._watches.get(flow.id)) is not None:
            watch.last = time.monotonic()
        elif (
            flow.response is None and CALL_KEY in flow.metadata and ORIGINAL_URL_KEY not in flow.metadata
            and (limit := self._limit()) is not None
        ):  # fmt: skip
            self._watch(flow, limit)

    def _limit(self) -> float | None:
        settings = self._options.settings
        return settings.upstream_idle_timeout if settings is not None else None

    def _watch(self, flow: http.HTTPFlow, limit: float) -> _Watch:
        watch = self._watches[flow.id] = _Watch(flow, limit, disarm_idle_timeout(flow))
        self._check_at(watch.last + limit)
        return watch

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        watch = self._watches.get(flow.id)
        if watch is None:
            return
        watch.last = time.monotonic()
        response = flow.response
        if not callable(response.stream):  # a buffered body (not recorded): the limit applies up to its head
            self._end(flow)
            return
        response.stream = _touching(watch, response.stream)

    def response(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def done(self) -> None:
        for watch in self._watches.values():
            watch.rearm()
        self._watches.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._due = None, math.inf

    def _end(self, flow: http.HTTPFlow) -> None:
        watch = self._watches.pop(flow.id, None)
        if watch is not None:
            watch.rearm()

    def _check_at(self, due: float) -> None:
        """Have the calls checked at `due` (time.monotonic()) at the latest."""
        if due >= self._due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._check)
        self._due = due

    def _check(self) -> None:
        self._timer, self._due = None, math.inf
        now = time.monotonic()
        due = math.inf
        for watch in list(self._watches.values()):
            if watch.given_up:
                continue
            if now - watch.last >= watch.limit and not self._give_up(watch, now):
                watch.last = now  # not asked for yet: looked at again a whole limit later
            if not watch.given_up:
                due = min(due, watch.last + watch.limit)
        if due < math.inf:
            self._check_at(due)

    @staticmethod
    def _give_up(watch: _Watch, now: float) -> bool:
        """Close the upstream connection of a call silent for its limit (False if
        it has none yet)."""
        flow = watch.flow
        message = f"upstream sent nothing for {watch.limit:g} s (idle timeout)"
        flow.metadata[CALL_KEY]["upstream_failure"] = {"kind": "upstream_timeout", "message": message,
                                                       "answered": flow.response is not None}  # fmt: skip
        if not close_server_connection(flow, "idle timeout"):  # (also a connection still being made)
            del flow.metadata[CALL_KEY]["upstream_failure"]
            return False
        watch.given_up = True
        logger.warning(f"llm-traj: {flow.request.pretty_url}: {message}")
        return True
