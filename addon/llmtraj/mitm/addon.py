"""Assembles the llm-traj addons.

Each concern is a small mitmproxy-style addon class (hooks named as mitmproxy's).
mitmproxy itself sees one object, `LlmTraj`, that forwards every hook to the
parts implementing it, in order: mitmproxy's dispatch costs a few µs per addon
object and hook on every flow event, which across a dozen parts was a
measurable share of a recorded call; a prebuilt list per hook costs a
fraction of that. It keeps mitmproxy's contracts: a part failing is logged
and skips no other part, `OptionsError` and `AddonHalt` pass through (as
`addonmanager.safecall` lets them), and the parts' commands are the object's.
"""

from __future__ import annotations

import gc
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence

from mitmproxy import exceptions

from .access import ControlAccess
from .anticalling import AntiCalling
from .endpoints import ProxyEndpoints
from .loopback import Loopback
from .model_keeping import ModelListKeeper
from .offline import OfflineReplay
from .options import LlmTrajOptions, check_set_values, startup_error
from .prompting import Prompting
from .proxy_errors import OpenAIShapedProxyErrors
from .quiet_log import QuietStreamingLog
from .recording import Recorder
from .replaying import Replayer
from .routing import Routing
from .token_capture import TokenCapture
from .upstream_idle import UpstreamIdleTimeout
from .training import TrainerControls
from .uploading import Uploading
from .upstreaming import UpstreamForwarding, UpstreamRouting
from .webview import WebAnnotations, WebChatView

logger = logging.getLogger("llm_traj")

LIFECYCLE_HOOKS = ("load", "configure", "running", "done")
FLOW_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error")


_PASSED_ON = (exceptions.OptionsError, exceptions.AddonHalt)  # for mitmproxy: roll back options, stop the event


def _chain(name: str, handlers: list[Callable]) -> Callable | None:
    """One hook calling each part's in order (None when no part has it). A part
    may return an awaitable (as mitmproxy allows): the parts after it then run
    once it is done."""
    if not handlers:
        return None

    def failed(handler: Callable) -> None:  # one part failing must not skip the others (as with separate addons)
        logger.exception(f"llm-traj: {name} hook of {type(handler.__self__).__name__} failed")

    async def finish(i: int, pending: Awaitable, args: tuple) -> None:
        try:
            await pending
        except _PASSED_ON:
            raise
        except Exception:
            failed(handlers[i])
        for handler in handlers[i + 1 :]:
            try:
                result = handler(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except _PASSED_ON:
                raise
            except Exception:
                failed(handler)

    def run(*args):
        for i, handler in enumerate(handlers):
            try:
                result = handler(*args)
            except _PASSED_ON:
                raise
            except Exception:
                failed(handler)
                continue
            if result is not None and inspect.isawaitable(result):
                return finish(i, result, args)
        return None

    return run


class LlmTraj:
    """The parts behind one addon object. The flow hooks call only the parts
    that serve flows in the current configuration (a part may say it does not
    with `serves_flows()`: the replayer outside replay mode, say): the chains
    are rebuilt after every `configure` and at `running`. The parts' mitmproxy
    commands are attributes of this object, where mitmproxy collects them."""

    def __init__(self, parts: Sequence[object]) -> None:
        self.parts = list(parts)
        self._running = False
        for name in LIFECYCLE_HOOKS:
            setattr(self, f"_{name}_parts", _chain(name, [getattr(part, name) for part in self.parts if hasattr(part, name)]))
        for part in self.parts:
            for attr, value in vars(type(part)).items():
                if isinstance(getattr(value, "command_name", None), str):
                    setattr(self, f"command_{attr}", getattr(part, attr))
        self._rebuild()

    def _rebuild(self) -> None:
        serving = [part for part in self.parts if getattr(part, "serves_flows", lambda: True)()]
        for name in FLOW_HOOKS:
            setattr(self, name, _chain(name, [getattr(part, name) for part in serving if hasattr(part, name)]))

    def load(self, loader) -> None:
        if self._load_parts is not None:
            self._load_parts(loader)
        check_set_values()

    def configure(self, updated: set[str]) -> None:
        try:
            if self._configure_parts is not None:
                self._configure_parts(updated)
        except exceptions.OptionsError as exc:
            if self._running:
                raise  # mitmproxy rolls the change back (and configures again with the old values)
            # At startup mitmproxy would print a script's OptionsError with a
            # traceback; one line instead, and mitmdump exits (errorcheck).
            startup_error(str(exc))
        finally:
            self._rebuild()

    def running(self) -> None:
        self._running = True
        if self._running_parts is not None:
            self._running_parts()
        self._rebuild()
        # What mitmproxy and the addon have built by now (modules, classes, the
        # options, replay's index) lives as long as the proxy: frozen, the cyclic
        # garbage collector no longer walks it on every full pass, which on the
        # hot path cost a recorded small call about 40 µs (of about 1 ms).
        gc.freeze()

    def done(self):
        return self._done_parts() if self._done_parts is not None else None


def make_addons() -> list[object]:
    # Order matters: hooks run in this order. Routing tags LLM calls first; a
    # mode that answers a call itself does so in `request` before the recorder
    # looks (or rewrites the flow to the loopback server after it). The web
    # parts come last: they read what the others tagged (and do nothing under mitmdump).
    options = LlmTrajOptions()
    loopback = Loopback()
    recorder = Recorder(options)
    replayer = Replayer(options, loopback, recorder)  # configures before the recorder: see Recorder.marked_path
    token = secrets.token_urlsafe(32)  # the control API's and the proxy's own state-changing endpoints'
    anticalling = AntiCalling(options, loopback, token)  # after the recorder, which tees the call's original URL
    access = ControlAccess(options, anticalling, token)  # configures after anticalling: writes its address
    # The upstream route is chosen before the recorder captures the call as the
    # agent made it, and applied (token capture's fields, model rewrite, key,
    # retries) after.
    upstream_routing = UpstreamRouting(options)
    # A prompt override rewrites the request before any mode reads it (replay
    # matches, the recorder captures, a driver sees the version sent).
    prompting = Prompting(recorder, access)
    forwarding = UpstreamForwarding(options, upstream_routing, loopback)
    recorder.bridged = forwarding.take_bridged
    uploading = Uploading(options, recorder, access)  # after the recorder: at shutdown it uploads what the writer wrote
    anticalling.listeners.append(uploading)  # a session that ends goes up
    parts = [
        options, OpenAIShapedProxyErrors(), QuietStreamingLog(), loopback, Routing(options), TrainerControls(options, access),
        prompting, ProxyEndpoints(options, replayer, recorder), replayer, OfflineReplay(options, replayer), upstream_routing,
        recorder, ModelListKeeper(options), anticalling, access, TokenCapture(options, upstream_routing, recorder),
        forwarding, uploading, WebAnnotations(options), WebChatView(),
        UpstreamIdleTimeout(options),  # last: it watches the calls no part answered, with the body's stream set
    ]
    return [LlmTraj(parts)]
