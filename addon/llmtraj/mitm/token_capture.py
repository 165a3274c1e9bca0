"""What record mode changes in a call for RL training:

- capture on request (`llm_traj_capture_tokens`, or `capture_tokens` per
  provider or model in `llm_traj_config`): the upstream request gets what the
  engine needs to return token ids and logprobs, and the agent gets the
  response without what it did not ask for, event by event as the stream passes;
- sampling control (`sampling` per provider or model): sampling keys the
  route does not allow are taken out, its fixed values imposed.

Runs after the recorder took the request as the agent sent it. The recorder's
stream function keeps the engine's bytes (the record writer makes the `tokens`
field of them, and the agent's events again by the same rules) and then hands
each chunk to the rewrite (one call a chunk: a wrapper around it cost about
0.4 µs an event more). Per event only what changes is parsed and written anew."""

from __future__ import annotations

import logging

from mitmproxy import http
from pydantic_core import from_json

from ..core.headers import header
from ..tokens.capture import ENGINES, CapturePlan, StreamHider, engine_json, hide_in_body, plan_capture
from .options import LlmTrajOptions
from .recording import Recorder
from .routing import CALL_KEY, llm_call
from .upstreaming import UpstreamRouting

logger = logging.getLogger("llm_traj")


class TokenCapture:
    def __init__(self, options: LlmTrajOptions, routing: UpstreamRouting, recorder: Recorder) -> None:
        self._options = options
        self._routing = routing
        self._recorder = recorder  # whose stream function passes each chunk on through the rewrite
        self._plans: dict[str, CapturePlan] = {}  # by flow id, until the response starts

    def serves_flows(self) -> bool:
        settings = self._options.settings
        return settings is not None and settings.mode == "record" and (
            settings.may_capture_tokens or settings.registry is not None)

    def request(self, flow: http.HTTPFlow) -> None:
        call = llm_call(flow)
        if call is None or flow.response is not None:
            return
        settings = self._options.settings
        target = self._routing.targets.get(flow.id)
        route = target.route if target is not None else None
        if route is not None and route.bridges(call.api.name):
            return  # the bridge applies both to the chat request it makes
        capture = route.capture_tokens if route is not None and route.capture_tokens is not None else settings.capture_tokens
        sampling = route.sampling if route is not None else None
        if not capture and sampling is None:
            return
        request = flow.request
        try:
            body = from_json(request.get_content(strict=False) or b"null")
        except ValueError:
            return  # not JSON: the upstream answers it as it is
        if not isinstance(body, dict):
            return
        sent, info = body, flow.metadata[CALL_KEY]
        if sampling is not None:
            sent, note = sampling.apply(body)
            if note:
                info["sampling"] = note
        plan = plan_capture(call.api.name, sent, route.kind if route is not None and route.kind in ENGINES else "vllm") if capture else None
        if plan is not None:
            sent = {**sent, **plan.added}
            # the response is rewritten as it passes: it must come uncompressed
            request.headers["accept-encoding"] = "identity"
            self._plans[flow.id] = plan
            info["capture"] = plan.note()
        if sent is not body:
            request.content = engine_json(sent)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        plan = self._plans.pop(flow.id, None)
        if plan is None:
            return
        response = flow.response
        fields = response.headers.fields  # (raw pairs: a `Headers` lookup raises and catches a KeyError for a missing name)
        if header(fields, b"content-encoding") is not None:
            logger.warning("llm-traj: the upstream compressed a captured response; passed on unchanged")
            flow.metadata[CALL_KEY]["capture"] = {**plan.note(), "passed_unchanged": True}
            return
        if (header(fields, b"content-type") or b"").lower().startswith(b"text/event-stream"):
            passing = StreamHider(plan).feed
        else:
            # one JSON object, rewritten whole at its end: the length changes
            parts: list[bytes] = []
            response.headers.pop("content-length", None)
            if response.http_version == "HTTP/1.1":
                response.headers["transfer-encoding"] = "chunked"

            def passing(data: bytes) -> bytes:
                if data:
                    parts.append(data)
                    return b""
                return hide_in_body(b"".join(parts), plan)

        if not self._recorder.stream_through(flow, passing):

            def rewrite(data: bytes) -> bytes | tuple[()]:
                return passing(data) or ()  # never b"" for a piece: in a chunked response that is the end

            response.stream = rewrite

    def error(self, flow: http.HTTPFlow) -> None:
        self._plans.pop(flow.id, None)
