"""Assembles the llm-traj addons in hook order."""

from __future__ import annotations

from .loopback import Loopback
from .options import LlmTrajOptions
from .proxy_errors import OpenAIShapedProxyErrors
from .recording import Recorder
from .routing import Routing


def make_addons() -> list[object]:
    # Order matters: hooks run in this order. Routing tags LLM calls first; a
    # mode that answers a call itself does so in `request` before the recorder
    # looks (or rewrites the flow to the loopback server after it).
    options = LlmTrajOptions()
    loopback = Loopback()
    return [options, OpenAIShapedProxyErrors(), loopback, Routing(options), Recorder(options)]
