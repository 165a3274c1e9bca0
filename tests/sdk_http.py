"""The HTTP library under each SDK, for tests that hand an SDK its own
`http_client` (a mock transport, a proxy, a CA bundle): httpx under openai 2.x
and anthropic 0.x, httpx2 under openai 3.x and anthropic 1.x and later, which
refuse httpx objects."""

from __future__ import annotations

import importlib
from types import ModuleType


def http_of(sdk: ModuleType) -> ModuleType:
    """httpx or httpx2: whichever `sdk` (the openai or anthropic module) is built on."""
    base_client = importlib.import_module(f"{sdk.__name__}._base_client")
    return getattr(base_client, "httpx2", None) or base_client.httpx


def broken_stream_error() -> type[Exception]:
    """What the openai SDK raises when a stream breaks off part way: httpx's
    RemoteProtocolError as it is (openai 2.x), or wrapped in APIConnectionError (3.x)."""
    import openai

    if int(openai.__version__.split(".")[0]) >= 3:
        return openai.APIConnectionError
    return http_of(openai).RemoteProtocolError
