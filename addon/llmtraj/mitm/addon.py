"""Assembles the llm-traj addons in hook order."""

from __future__ import annotations

from .options import LlmTrajOptions
from .proxy_errors import OpenAIShapedProxyErrors
from .recording import Recorder
from .routing import Routing


def make_addons() -> list[object]:
    options = LlmTrajOptions()
    return [options, OpenAIShapedProxyErrors(), Routing(options), Recorder(options)]
