"""What the addon does to a flow's connections through mitmproxy's connection
handlers (the `proxyserver` addon's), which no hook offers."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from mitmproxy import ctx, http
from mitmproxy.connection import Server


def disarm_idle_timeout(flow: http.HTTPFlow) -> Callable[[], object]:
    """Keep mitmproxy from closing the agent's connection as idle (600 s:
    TCP_TIMEOUT in mitmproxy 11, `tcp_timeout` in 12) while the addon itself
    watches over its call, as mitmproxy does during hooks; calling the returned
    function re-arms it (once, however often it is called). The disarming is
    entered and left directly, not through an ExitStack: it is done for every
    call forwarded, and the stack cost several times the disarming itself."""
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    if handler is None:
        return keep_armed
    disarmed = handler.timeout_watchdog.disarm()
    disarmed.__enter__()
    return partial(disarmed.__exit__, None, None, None)  # (a generator's context: leaving it again does nothing)


def keep_armed() -> None:
    """The re-arming of an idle limit that was not disarmed."""


def close_server_connection(flow: http.HTTPFlow, why: str) -> bool:
    """Close the flow's upstream connection as if the upstream had, also one
    still being made (mitmproxy then ends the flow with an error); False if
    there is none."""
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    if handler is None:
        return False
    io = handler.transports.get(flow.server_conn)
    if io is None:
        # Still connecting: the flow has not been given its connection yet, the
        # one being made to its address is it (one request at a time on HTTP/1).
        connecting = [io for conn, io in handler.transports.items()
                      if isinstance(conn, Server) and io.writer is None and conn.address == flow.server_conn.address]  # fmt: skip
        io = connecting[0] if len(connecting) == 1 else None
    if io is None or io.handler is None:
        return False
    io.handler.cancel(why)
    return True
