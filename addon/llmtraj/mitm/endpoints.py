"""The proxy's own endpoints, answered by the proxy itself (never forwarded):

- `GET /llm-traj/health` (also `/health` in reverse mode): mode, path, config
  and routes; with `?upstreams`, whether each route's upstream accepts a
  connection (503 if one does not);
- `GET /v1/models`, `/v1/models/<id>` (and without `/v1`) from the upstream
  config's models, where the request is addressed to them;
- `GET /llm-traj/replay-report` in replay mode: the report so far (also the
  command `llm_traj.replay.report`).
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import parse_qs, unquote, urlsplit

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from ..replay.report import REPORT_PATH
from ..upstreams.registry import Registry, Route, address_of, model_object, models_list
from .options import LlmTrajOptions
from .replaying import Replayer
from .routing import error_response

HEALTH_PATH = "/llm-traj/health"
MODELS_PATHS = ("/v1/models", "/models")
REACHABILITY_TIMEOUT = 2.0


def json_response(status: int, obj: object) -> http.Response:
    return http.Response.make(status, json.dumps(obj, ensure_ascii=False), {"content-type": "application/json"})


class ProxyEndpoints:
    def __init__(self, options: LlmTrajOptions, replayer: Replayer) -> None:
        self._options = options
        self._replayer = replayer
        self._started = int(time.time())  # the models' `created`

    def requestheaders(self, flow: http.HTTPFlow):
        request = flow.request
        settings = self._options.settings
        if request.method != "GET" or settings is None or flow.response is not None:
            return None
        path = request.path.split("?", 1)[0]
        if path == HEALTH_PATH or (path == "/health" and isinstance(flow.client_conn.proxy_mode, ReverseMode)):
            return self._health(flow)
        if path == REPORT_PATH:
            report = self._replayer.report()
            if report is not None:
                flow.response = json_response(200, report)
            return None
        registry = settings.registry
        if registry is None or not _for_the_models(flow, registry):
            return None
        if path in MODELS_PATHS:
            flow.response = json_response(200, models_list(registry, self._started))
        elif path.startswith(tuple(p + "/" for p in MODELS_PATHS)):
            name = unquote(path.partition("/models/")[2])  # ids may hold slashes: Qwen/Qwen3-32B
            entry = registry.model(name)
            if entry is None:
                known = ", ".join(m.name for m in registry.models)
                flow.response = error_response(404, f"llm-traj: model {name!r} is not configured; known models: {known}",
                                               "invalid_request_error", "model_not_found")  # fmt: skip
            else:
                flow.response = json_response(200, model_object(entry, self._started))
        return None

    def _health(self, flow: http.HTTPFlow):
        settings = self._options.settings
        report = {
            "status": "ok",
            "mode": settings.mode,
            "path": str(settings.path),
            "config": settings.config_path,
            "routes": [{"name": r.name, "url": r.base_url, **({"upstream_api": r.upstream_api} if r.upstream_api else {})}
                       for r in _routes(settings.registry)],
        }
        if "upstreams" not in parse_qs(urlsplit(flow.request.path).query, keep_blank_values=True):
            flow.response = json_response(200, report)
            return None

        async def check() -> None:
            results = await asyncio.gather(*(_reachable(r) for r in report["routes"]))
            report["upstreams"] = results
            healthy = all(r["reachable"] for r in results)
            report["status"] = "ok" if healthy else "degraded"
            flow.response = json_response(200 if healthy else 503, report)

        return check()


def _for_the_models(flow: http.HTTPFlow, registry: Registry) -> bool:
    """Whether a request is addressed to the configured models: in reverse mode
    every request is; through HTTPS_PROXY only those to a configured upstream's
    host (another service's /models is not ours to answer)."""
    if isinstance(flow.client_conn.proxy_mode, ReverseMode):
        return True
    return (flow.request.host, flow.request.port) in registry.addresses


def _routes(registry: Registry | None) -> list[Route]:
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
