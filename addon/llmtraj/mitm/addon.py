"""Assembles the llm-traj addons.

Each concern is a small mitmproxy-style addon class (hooks named as mitmproxy's).
mitmproxy itself sees one object, `LlmTraj`, that forwards every hook to the
parts implementing it, in order: mitmproxy's dispatch costs a few µs per addon
object and hook on every flow event, which across eleven parts was a measurable
share of a recorded call; a prebuilt list per hook costs a fraction of that.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence

from .anticalling import AntiCalling
from .loopback import Loopback
from .options import LlmTrajOptions
from .proxy_errors import OpenAIShapedProxyErrors
from .quiet_log import QuietStreamingLog
from .recording import Recorder
from .replaying import Replayer
from .routing import Routing
from .token_capture import TokenCapture
from .upstreaming import UpstreamForwarding, UpstreamRouting
from .webview import WebAnnotations, WebChatView

logger = logging.getLogger("llm_traj")

LIFECYCLE_HOOKS = ("load", "configure", "running", "done")
FLOW_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error")


def _chain(name: str, handlers: list[Callable]) -> Callable | None:
    """One hook calling each part's in order (None when no part has it). A part
    may return an awaitable (as mitmproxy allows): the parts after it then run
    once it is done."""
    if not handlers:
        return None

    def failed(handler: Callable) -> None:  # one part failing must not skip the others (as with separate addons)
        logger.exception(f"llm-traj: {name} hook of {type(handler.__self__).__name__} failed")

    async def finish(pending: Awaitable, rest: list[Callable], args: tuple) -> None:
        await pending
        for handler in rest:
            try:
                result = handler(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except Exception:
                failed(handler)

    def run(*args):
        for i, handler in enumerate(handlers):
            try:
                result = handler(*args)
            except Exception:
                failed(handler)
                continue
            if result is not None and inspect.isawaitable(result):
                return finish(result, handlers[i + 1 :], args)
        return None

    return run


class LlmTraj:
    """The parts behind one addon object. The flow hooks call only the parts
    that serve flows in the current configuration (a part may say it does not
    with `serves_flows()`: the replayer outside replay mode, say): the chains
    are rebuilt after every `configure` and at `running`."""

    def __init__(self, parts: Sequence[object]) -> None:
        self.parts = list(parts)
        for name in LIFECYCLE_HOOKS:
            chain = _chain(name, [getattr(part, name) for part in self.parts if hasattr(part, name)])
            setattr(self, name, self._then_rebuild(chain) if name in ("configure", "running") else chain)
        self._rebuild()

    def _rebuild(self) -> None:
        serving = [part for part in self.parts if getattr(part, "serves_flows", lambda: True)()]
        for name in FLOW_HOOKS:
            setattr(self, name, _chain(name, [getattr(part, name) for part in serving if hasattr(part, name)]))

    def _then_rebuild(self, chain: Callable | None) -> Callable:
        def run(*args):
            result = chain(*args) if chain is not None else None
            if result is None:
                self._rebuild()
                return None

            async def rebuild_after() -> None:
                await result
                self._rebuild()

            return rebuild_after()

        return run


def make_addons() -> list[object]:
    # Order matters: hooks run in this order. Routing tags LLM calls first; a
    # mode that answers a call itself does so in `request` before the recorder
    # looks (or rewrites the flow to the loopback server after it). The web
    # parts come last: they read what the others tagged (and do nothing under mitmdump).
    options = LlmTrajOptions()
    loopback = Loopback()
    recorder = Recorder(options)
    replayer = Replayer(options, loopback, recorder)  # configures before the recorder: see Recorder.marked_path
    anticalling = AntiCalling(options, loopback)  # after the recorder, which tees the call's original URL
    # The upstream route is chosen before the recorder captures the call as the
    # agent made it, and applied (token capture's fields, model rewrite, key,
    # retries) after.
    upstream_routing = UpstreamRouting(options)
    parts = [
        options, OpenAIShapedProxyErrors(), QuietStreamingLog(), loopback, Routing(options), replayer, upstream_routing,
        recorder, anticalling, TokenCapture(options, upstream_routing), UpstreamForwarding(options, upstream_routing, loopback),
        WebAnnotations(options), WebChatView(),
    ]
    return [LlmTraj(parts)]
