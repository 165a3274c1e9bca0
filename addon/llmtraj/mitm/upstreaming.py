"""Upstreams: which route a call takes (by its `model`, from `llm_traj_config`),
sending it there (with the real key, and with retries and timeouts where the
route asks for them), and the proxy's own endpoints: `GET /v1/models[/<id>]`
from the registry, and `GET /llm-traj/health` (also `/health` in reverse mode).

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
import time
from urllib.parse import parse_qs, unquote, urlsplit

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode
from pydantic_core import from_json

from ..apis import API_BY_NAME
from ..upstreams.client import Attempt, UpstreamClient, UpstreamFailure
from ..upstreams.config import AUTH_HEADERS
from ..upstreams.registry import (
    Registry,
    RetryPolicy,
    Route,
    Target,
    UnknownModel,
    address_of,
    model_object,
    models_list,
)
from .loopback import ORIGINAL_URL_KEY, Loopback, ProducedResponse
from .options import LlmTrajOptions
from .routing import CALL_KEY, error_response, llm_call

logger = logging.getLogger("llm_traj")

HEALTH_PATH = "/llm-traj/health"
MODELS_PATHS = ("/v1/models", "/models")
REACHABILITY_TIMEOUT = 2.0


def _json_response(status: int, obj: object) -> http.Response:
    return http.Response.make(status, json.dumps(obj, ensure_ascii=False), {"content-type": "application/json"})


class UpstreamRouting:
    def __init__(self, options: LlmTrajOptions) -> None:
        self._options = options
        self._started = int(time.time())
        self.targets: dict[str, Target] = {}  # by flow id, until `UpstreamForwarding` takes it

    @property
    def _registry(self) -> Registry | None:
        settings = self._options.settings
        return settings.registry if settings is not None else None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if self._options.settings is None or flow.response is not None or request.method != "GET":
            return
        path = request.path.split("?", 1)[0]
        if path == HEALTH_PATH or (path == "/health" and isinstance(flow.client_conn.proxy_mode, ReverseMode)):
            return self._health(flow)
        registry = self._registry
        if registry is None or not self._for_the_models(flow, registry):
            return
        if path in MODELS_PATHS:
            flow.response = _json_response(200, models_list(registry, self._started))
        elif path.startswith(tuple(p + "/" for p in MODELS_PATHS)):
            name = unquote(path.partition("/models/")[2])  # ids may hold slashes: Qwen/Qwen3-32B
            entry = registry.model(name)
            if entry is None:
                known = ", ".join(m.name for m in registry.models)
                flow.response = error_response(404, f"llm-traj: model {name!r} is not configured; known models: {known}",
                                               "invalid_request_error", "model_not_found")  # fmt: skip
            else:
                flow.response = _json_response(200, model_object(entry, self._started))

    @staticmethod
    def _for_the_models(flow: http.HTTPFlow, registry: Registry) -> bool:
        """Whether a request is addressed to the configured models: in reverse mode
        every request is; through HTTPS_PROXY only those to a configured upstream's
        host (another service's /models is not ours to answer)."""
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return True
        return (flow.request.host, flow.request.port) in registry.addresses

    def request(self, flow: http.HTTPFlow) -> None:
        settings = self._options.settings
        if settings is None or not settings.routes_calls or flow.response is not None:
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
            flow.response = _json_response(404, body)

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

    def _health(self, flow: http.HTTPFlow):
        settings = self._options.settings
        report = {
            "status": "ok",
            "mode": settings.mode,
            "path": str(settings.path),
            "config": settings.config_path,
            "routes": [{"name": r.name, "url": r.base_url} for r in self._routes()],
        }
        if "upstreams" not in parse_qs(urlsplit(flow.request.path).query, keep_blank_values=True):
            flow.response = _json_response(200, report)
            return None

        async def check() -> None:
            results = await asyncio.gather(*(_reachable(r) for r in report["routes"]))
            report["upstreams"] = results
            healthy = all(r["reachable"] for r in results)
            report["status"] = "ok" if healthy else "degraded"
            flow.response = _json_response(200 if healthy else 503, report)

        return check()

    def _routes(self) -> list[Route]:
        registry = self._registry
        if registry is not None:
            return registry.routes
        modes = [ProxyMode.parse(spec) for spec in ctx.options.mode]
        return [  # no config: the reverse-mode targets
            Route("reverse", f"{mode.scheme}://{mode.address[0]}:{mode.address[1]}")
            for mode in modes if isinstance(mode, ReverseMode)
        ]


async def _reachable(route: dict) -> dict:
    started = time.perf_counter()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*address_of(route["url"])), REACHABILITY_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        return {**route, "reachable": False, "error": str(exc) or type(exc).__name__}
    writer.close()
    return {**route, "reachable": True, "connect_ms": round((time.perf_counter() - started) * 1000, 2)}


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

    def serves_flows(self) -> bool:
        settings = self._options.settings
        return settings is not None and settings.routes_calls

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
        method, policy = request.method, route.policy
        api = call.api if call is not None else API_BY_NAME["chat.completions"]  # OpenAI's error shape for the rest

        async def produce() -> ProducedResponse:
            try:
                response = await self._get_client().send(method, url, headers, body, policy, attempts)
            except UpstreamFailure as exc:
                upstream["error"] = exc.message
                logger.warning(f"llm-traj: {route.name}: {exc.message} ({len(attempts)} attempt(s))")
                payload = json.dumps(api.error_body(f"llm-traj: {exc.message}", "proxy_error", exc.code))
                return ProducedResponse(exc.status, [("content-type", "application/json")], payload.encode())
            if len(attempts) > 1:
                logger.info(f"llm-traj: {route.name}: {response.status} after {len(attempts)} attempts")
            return ProducedResponse(response.status, response.headers, _noting_failure(response.body, upstream))

        self._loopback.serve(flow, produce)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._restore_auth(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._restore_auth(flow)

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


async def _noting_failure(body, upstream: dict):
    """The body, with why it stopped (idle timeout, upstream hang-up) noted for the record."""
    try:
        async for piece in body:
            yield piece
    except ConnectionError as exc:
        upstream["error"] = str(exc)
        logger.warning(f"llm-traj: {upstream['route']}: {exc}")
        raise
