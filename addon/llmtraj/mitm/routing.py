"""Finds which session and API a request belongs to, before any mode acts on it.

Strips the `/s/<session>/` prefix (for every request, so a base URL with a
session also works for `/models` and the like) and the session header, so the
upstream sees the request the agent would have sent it directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Required, TypedDict

from mitmproxy import http

from ..apis import API_BY_NAME, ApiShape, api_for
from ..core.session import (
    SESSION_HEADER,
    InvalidSession,
    split_session_prefix,
    validate_session,
)
from .options import LlmTrajOptions

_SESSION_HEADER = SESSION_HEADER.encode()
CALL_KEY = "llm_traj"  # flow.metadata key of a `CallMetadata`


class CallMetadata(TypedDict, total=False):
    """What the parts note about an LLM call in `flow.metadata["llm_traj"]`.
    JSON-able: mitmweb shows it and `-w` flow files keep it, so never a key."""

    session: Required[str]  # Routing
    api: Required[str]  # Routing: the ApiShape's name
    index: int  # the call's number in its session: the recorder's, or the replayed step's
    replay: str  # Replayer: the rung that matched (exact, later, position), or "miss"
    record: bool  # Replayer: a forwarded miss the recorder records (forward-record)
    anticall_id: str  # AntiCalling: the held call's id
    extra: dict[str, Any]  # AntiCalling: what drivers push beside the answer, for the record's `extra`
    upstream: dict[str, Any]  # UpstreamForwarding: the route, URL, model and attempts, for the record
    prompt: dict[str, Any]  # Prompting: the override sent and the agent's prompt hash, for the record
    capture: dict[str, Any]  # TokenCapture: the plan (fields added upstream), for the record
    sampling: dict[str, Any]  # TokenCapture: what the route's sampling control changed, for the record
    bridge: dict[str, Any]  # UpstreamForwarding: the call is bridged to an upstream of another API (`upstream_api`)
    # UpstreamForwarding, UpstreamIdleTimeout: why the upstream failed, for the record and the agent's error:
    # {"kind": the record's error kind, "message", "answered": whether the upstream's response head came}
    upstream_failure: dict[str, Any]


@dataclass(frozen=True)
class LlmCall:
    session: str
    api: ApiShape


def llm_call(flow: http.HTTPFlow) -> LlmCall | None:
    """The LLM call a flow carries, as found by `Routing`; None for other traffic."""
    info = flow.metadata.get(CALL_KEY)
    if info is None:
        return None
    return LlmCall(session=info["session"], api=API_BY_NAME[info["api"]])


def error_response(status: int, message: str, type: str, code: str | None = None, api: ApiShape | None = None) -> http.Response:
    """An error for the agent, in the shape of the API it called (OpenAI's for other requests)."""
    body = (api or API_BY_NAME["chat.completions"]).error_body(message, type, code)
    return http.Response.make(status, json.dumps(body), {"content-type": "application/json"})


class Routing:
    def __init__(self, options: LlmTrajOptions) -> None:
        self._options = options

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        settings = self._options.settings
        if settings is None:
            return
        request = flow.request
        session, path = split_session_prefix(request.path)
        if session is not None:
            request.path = path
        # Looked up in the raw fields: mitmproxy's Headers.get costs several
        # times more, and this runs for every request.
        header_session = next((v.decode("latin-1") for k, v in request.headers.fields if k.lower() == _SESSION_HEADER), None)
        if header_session is not None:
            del request.headers[SESSION_HEADER]
        if session is None:  # (an empty `/s//` is a session given, and refused below)
            session = header_session or settings.default_session
        api = api_for(request.method, path.split("?", 1)[0])
        if api is None:
            return
        try:
            validate_session(session)
        except InvalidSession as exc:
            flow.response = error_response(400, str(exc), "invalid_request_error", "invalid_session", api)
            return
        metadata: CallMetadata = {"session": session, "api": api.name}
        flow.metadata[CALL_KEY] = metadata
