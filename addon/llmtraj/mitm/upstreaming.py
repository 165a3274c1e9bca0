"""Upstreams: which route a call takes (by its `model`, from `llm_traj_config`),
and sending it there (with the real key, and with retries and timeouts where
the route asks for them).

Two parts, because the record must keep the call as the agent made it:
`UpstreamRouting` decides before the recorder captures the call (and answers
an unknown model there); `UpstreamForwarding` rewrites the call after it.
What they keep per flow stays out of `flow.metadata`, which mitmproxy
serialises (`-w` flow files, mitmweb) and which must not hold a key.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import replace

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ReverseMode
from pydantic_core import from_json

from ..apis import API_BY_NAME, ApiShape, no_response_answer
from ..bridge import UPSTREAM_API, AgentAnswer, BridgedCall, Untranslatable, json_answer, to_chat
from ..tokens.capture import ENGINES, plan_capture
from ..upstreams.client import Attempt, UpstreamClient, UpstreamFailure, UpstreamResponse, forward_headers
from ..upstreams.config import AUTH_HEADERS
from ..upstreams.registry import Registry, RetryPolicy, Route, Target, UnknownModel
from .endpoints import json_response
from .connections import disarm_idle_timeout, keep_armed
from .loopback import ORIGINAL_URL_KEY, Loopback, ProducedResponse
from .options import LlmTrajOptions
from .routing import CALL_KEY, llm_call

logger = logging.getLogger("llm_traj")


class UpstreamRouting:
    def __init__(self, options: LlmTrajOptions) -> None:
        self._options = options
        self.targets: dict[str, Target] = {}  # by flow id, until `UpstreamForwarding` takes it

    def serves_flows(self) -> bool:
        settings = self._options.settings
        return settings is not None and settings.routes_calls

    def request(self, flow: http.HTTPFlow) -> None:
        settings = self._options.settings
        if flow.response is not None:
            return
        call = llm_call(flow)
        if call is None:
            self._route_other(flow, settings.registry)
            return
        if ORIGINAL_URL_KEY in flow.metadata:  # answered by the addon itself (anti-call, paced replay)
            return
        if settings.mode != "record" and flow.metadata[CALL_KEY].get("replay") != "miss":
            return  # answered by the addon: only replay's forwarded misses go upstream
        registry = settings.registry
        if registry is None:  # retries only: where the agent sent it
            self.targets[flow.id] = Target(Route("agent", None, policy=RetryPolicy(retries=settings.retries)), None)
            return
        try:
            self.targets[flow.id] = registry.target(_model_of(flow.request))
        except UnknownModel as exc:
            body = call.api.error_body(str(exc), "invalid_request_error", "model_not_found")
            flow.response = json_response(404, body)

    def _route_other(self, flow: http.HTTPFlow, registry: Registry | None) -> None:
        """A request that is not an LLM call (embeddings, files, ...) in reverse
        mode, where every request is meant for the model endpoint: to its model's
        route, else the default route, else where the proxy's reverse target is.
        Through HTTPS_PROXY other traffic is the agent's own business."""
        if registry is None or not isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return
        try:
            self.targets[flow.id] = registry.target(_model_of(flow.request))
        except UnknownModel:
            pass


class UpstreamForwarding:
    """Sends each routed call to its route: mitmproxy forwards it when the route
    has no retries or timeouts, else the addon's own client does (behind the
    loopback server, so the response still streams through mitmproxy)."""

    def __init__(self, options: LlmTrajOptions, routing: UpstreamRouting, loopback: Loopback) -> None:
        self._options = options
        self._routing = routing
        self._loopback = loopback
        self._client: UpstreamClient | None = None
        self._agent_auth: dict[str, list[tuple[str, str]]] = {}  # by flow id: the agent's key headers, put back once sent
        self._bridged: dict[str, BridgedCall] = {}  # by flow id, until the call's record takes it

    def serves_flows(self) -> bool:
        return self._routing.serves_flows()

    def configure(self, updated: set[str]) -> None:
        if "ssl_insecure" in updated and self._client is not None:
            client, self._client = self._client, None
            asyncio.ensure_future(client.aclose())

    def request(self, flow: http.HTTPFlow) -> None:
        target = self._routing.targets.pop(flow.id, None)
        if target is None or flow.response is not None:
            return
        request = flow.request
        route = target.route
        url = route.url_for(request.path) if route.base_url is not None else request.url
        call = llm_call(flow)
        upstream = {"route": route.name, "url": url}
        if call is not None:  # in the call's record
            flow.metadata[CALL_KEY]["upstream"] = upstream
        if target.upstream_model is not None:
            upstream["model"] = target.upstream_model
            _set_model(request, target.upstream_model)
        if call is not None and route.bridges(call.api.name):
            self._bridge(flow, call.api, route, upstream)
            return
        if route.api_key is not None:
            self._agent_auth[flow.id] = [(k, v) for k, v in request.headers.items(multi=True) if k.lower() in AUTH_HEADERS]
            _set_auth(request.headers, route.auth_headers())
        if not route.policy.needs_client:
            request.url = url
            return
        attempts: list[Attempt] = []
        upstream["attempts"] = attempts  # filled in as they happen; complete before the response streams
        headers = list(request.headers.items(multi=True))
        if flow.id in self._agent_auth:  # the key only goes to the client, never stays on the flow
            _set_auth(request.headers, self._agent_auth.pop(flow.id))
        body = request.raw_content or b""
        method, policy = request.method, self._with_idle_limit(route.policy)
        api = call.api if call is not None else API_BY_NAME["chat.completions"]  # OpenAI's error shape for the rest
        info = flow.metadata[CALL_KEY] if call is not None else {}  # (what is noted of other requests is not kept)

        async def produce() -> ProducedResponse:
            rearm = _our_idle_limit(flow, policy)
            try:
                response = await self._send(route, upstream, policy, attempts, method, url, headers, body)
            except BaseException:
                rearm()
                raise
            if isinstance(response, UpstreamFailure):
                rearm()
                info["upstream_failure"] = {"kind": response.kind, "message": response.message, "answered": False}
                status, payload = no_response_answer(api, response.kind, response.message)
                return ProducedResponse(status, [("content-type", "application/json")], json.dumps(payload).encode())
            return ProducedResponse(response.status, response.headers, _noting_failure(response.body, upstream, info),
                                    on_done=lambda completed: rearm())  # fmt: skip

        self._loopback.serve(flow, produce)

    async def _send(self, route: Route, upstream: dict, policy: RetryPolicy, attempts: list[Attempt], method: str,
                    url: str, headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse | UpstreamFailure:
        """The upstream's response, or why none came (noted in the record's `upstream`, and logged)."""
        try:
            response = await self._get_client().send(method, url, headers, body, policy, attempts)
        except UpstreamFailure as exc:
            upstream["error"] = exc.message
            logger.warning(f"llm-traj: {route.name}: {exc.message} ({len(attempts)} attempt(s))")
            return exc
        if len(attempts) > 1:
            logger.info(f"llm-traj: {route.name}: {response.status} after {len(attempts)} attempts")
        return response

    def _with_idle_limit(self, policy: RetryPolicy) -> RetryPolicy:
        """The route's policy with `llm_traj_upstream_idle_timeout` as its
        first-byte and idle timeouts where it sets none."""
        limit = self._options.settings.upstream_idle_timeout
        if limit is None or (policy.first_byte_timeout is not None and policy.idle_timeout is not None):
            return policy
        return replace(policy, first_byte_timeout=policy.first_byte_timeout or limit, idle_timeout=policy.idle_timeout or limit)

    def _bridge(self, flow: http.HTTPFlow, api: ApiShape, route: Route, upstream: dict) -> None:
        """Sends a call to an upstream of another API (`llmtraj.bridge`): the
        request translated to chat completions (with the route's sampling
        control and token capture applied to it), the answer translated back
        event by event through the loopback server; what is untranslatable is
        refused with a 400 in the agent's shape."""
        request = flow.request
        if route.upstream_api != UPSTREAM_API:
            message = f"llm-traj: route {route.name} speaks {route.upstream_api}; calls are bridged only to {UPSTREAM_API}"
            self._loopback.serve(flow, _answering(json_answer(400, api.error_body(message, "invalid_request_error", "bridge_unsupported"))))
            return
        try:
            agent_request = from_json(request.get_content(strict=False) or b"null")
            chat_request = to_chat(api.name, agent_request)
        except ValueError as exc:  # Untranslatable, or a body that is not JSON
            message = str(exc) if isinstance(exc, Untranslatable) else f"llm-traj bridge: the request body is not JSON ({exc})"
            self._loopback.serve(flow, _answering(json_answer(400, api.error_body(message, "invalid_request_error", "bridge_untranslatable"))))
            return
        url = route.url_for("/v1/chat/completions")
        upstream["url"] = url
        info = flow.metadata[CALL_KEY]
        info["bridge"] = {"upstream_api": UPSTREAM_API}
        if route.sampling is not None:
            chat_request, note = route.sampling.apply(chat_request)
            if note:
                info["sampling"] = note
        settings = self._options.settings
        bridged = BridgedCall(api, agent_request, chat_request, url)
        if route.capture_tokens if route.capture_tokens is not None else settings.capture_tokens:
            plan = plan_capture(UPSTREAM_API, chat_request, route.kind if route.kind in ENGINES else "vllm")
            if plan is not None:
                bridged.chat_request = {**chat_request, **plan.added}
                bridged.capture = plan.note()
        self._bridged[flow.id] = bridged
        attempts: list[Attempt] = []
        if route.policy.needs_client:
            upstream["attempts"] = attempts
        headers = _bridge_headers(request.headers, route, bridged.stream)
        policy, body = self._with_idle_limit(route.policy), bridged.body()

        async def produce() -> ProducedResponse:
            rearm = _our_idle_limit(flow, policy)
            try:
                response = await self._send(route, upstream, policy, attempts, "POST", url, headers, body)
                if isinstance(response, UpstreamFailure):
                    answer = bridged.unreachable(response.kind, response.message)
                else:
                    answer = await bridged.answer(response.status, response.headers, response.body)
            except BaseException:
                rearm()
                raise
            return ProducedResponse(answer.status, answer.headers, answer.body, on_done=lambda completed: rearm())

        self._loopback.serve(flow, produce)

    def take_bridged(self, flow_id: str) -> dict | None:
        """The upstream side of a bridged call, for its record (once, when it ends)."""
        bridged = self._bridged.pop(flow_id, None)
        return bridged.note() if bridged is not None else None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._restore_auth(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._bridged.pop(flow.id, None)  # not recorded (replay's forwarded misses)

    def error(self, flow: http.HTTPFlow) -> None:
        self._restore_auth(flow)
        self._bridged.pop(flow.id, None)

    def _restore_auth(self, flow: http.HTTPFlow) -> None:
        # The request has gone: the flow (shown in mitmweb, saved by `-w`) keeps
        # the agent's own key headers, not the injected key.
        saved = self._agent_auth.pop(flow.id, None)
        if saved is not None:
            _set_auth(flow.request.headers, saved)

    def _get_client(self) -> UpstreamClient:
        if self._client is None:
            self._client = UpstreamClient(verify=not ctx.options.ssl_insecure)
        return self._client

    def done(self):
        client, self._client = self._client, None
        return client.aclose() if client is not None else None


def _set_auth(headers: http.Headers, values: list[tuple[str, str]]) -> None:
    for name in AUTH_HEADERS:
        if name in headers:
            del headers[name]
    for name, value in values:
        headers.add(name, value)


def _model_of(request: http.Request) -> object:
    """The `model` of a JSON request body, if it names one."""
    if "json" not in request.headers.get("content-type", "json"):
        return None
    try:
        body = from_json(request.get_content(strict=False) or b"null")
    except ValueError:
        return None
    return body.get("model") if isinstance(body, dict) else None


def _set_model(request: http.Request, model: str) -> None:
    try:
        body = from_json(request.get_content(strict=False) or b"null")
    except ValueError:
        return
    if isinstance(body, dict):
        body["model"] = model
        request.set_content(json.dumps(body, ensure_ascii=False).encode())


# Headers of the agent's request that belong to its own API or body: not sent with the translated one.
_NOT_BRIDGED = frozenset({"content-type", "accept", "accept-encoding", "openai-beta", *AUTH_HEADERS})


def _bridge_headers(agent: http.Headers, route: Route, stream: bool) -> list[tuple[str, str]]:
    """The headers of a bridged request: the agent's own (user agent, tracing,
    ...) but those of its API (`anthropic-version`, `anthropic-beta`, its key),
    JSON, and the key: the route's, else the agent's as a bearer token (an
    Anthropic agent sends it as x-api-key)."""
    headers = [(k, v) for k, v in forward_headers(list(agent.items(multi=True)))
               if k.lower() not in _NOT_BRIDGED and not k.lower().startswith("anthropic-")]  # fmt: skip
    headers += [("content-type", "application/json"), ("accept", "text/event-stream" if stream else "application/json"),
                ("accept-encoding", "identity")]  # fmt: skip
    key = f"Bearer {route.api_key}" if route.api_key is not None else agent.get("authorization") or (
        f"Bearer {agent['x-api-key']}" if "x-api-key" in agent else None)
    return headers + [("authorization", key)] if key else headers


def _our_idle_limit(flow: http.HTTPFlow, policy: RetryPolicy) -> Callable[[], object]:
    """While the client waits for the upstream with an idle timeout of its own,
    mitmproxy's idle limit of the agent's connection is disarmed: the client's
    applies, and gives the agent a truthful answer (calling the returned function re-arms it)."""
    return disarm_idle_timeout(flow) if policy.idle_timeout is not None else keep_armed


def _answering(answer: AgentAnswer):
    async def produce() -> ProducedResponse:
        return ProducedResponse(answer.status, answer.headers, answer.body)

    return produce


async def _noting_failure(body, upstream: dict, info: dict):
    """The body, with why it stopped (idle timeout, upstream hang-up) noted for the record."""
    try:
        async for piece in body:
            yield piece
    except ConnectionError as exc:
        upstream["error"] = str(exc)
        info["upstream_failure"] = {"kind": getattr(exc, "kind", "upstream_disconnected"), "message": str(exc), "answered": True}
        logger.warning(f"llm-traj: {upstream['route']}: {exc}")
        raise
