"""Assembles the llm-traj addons in hook order."""

from __future__ import annotations

from .anticalling import AntiCalling
from .loopback import Loopback
from .options import LlmTrajOptions
from .proxy_errors import OpenAIShapedProxyErrors
from .recording import Recorder
from .replaying import Replayer
from .routing import Routing
from .webview import WebAnnotations, WebChatView


def make_addons() -> list[object]:
    # Order matters: hooks run in this order. Routing tags LLM calls first; a
    # mode that answers a call itself does so in `request` before the recorder
    # looks (or rewrites the flow to the loopback server after it).
    options = LlmTrajOptions()
    loopback = Loopback()
    recorder = Recorder(options)
    replayer = Replayer(options, loopback, recorder)  # configures before the recorder: see Recorder.marked_path
    anticalling = AntiCalling(options, loopback)  # after the recorder, which tees the call's original URL
    # The web addons come last: they read what the others tagged (and do nothing under mitmdump).
    return [
        options, OpenAIShapedProxyErrors(), loopback, Routing(options), replayer, recorder, anticalling,
        WebAnnotations(options), WebChatView(),
    ]
