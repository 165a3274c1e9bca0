"""Replay mode, fully offline: what an agent asks besides its LLM calls is
answered by the proxy too, so that a replay needs no upstream at all.

- `GET /v1/models` and `/v1/models/{id}`: from the lists record mode kept, or
  from the models of the recorded calls (`llmtraj.model_lists`);
- in reverse mode (base URL), nothing goes to the reverse target: probes such
  as `HEAD /` get a 200, anything else a 404 in the API's error shape saying
  it is not in the recording (unless llm_traj_replay_miss forwards misses);
- through HTTPS_PROXY, other traffic is left alone: only the model lists of
  the hosts the recording called are answered.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from ..core.model_lists import OfflineModels, is_anthropic, model_list_path, models_file, read_kept
from .options import LlmTrajOptions
from ..replay import Replay
from .replaying import Replayer
from .routing import error_response, llm_call

logger = logging.getLogger("llm_traj")

_PROBES = ("/", "")


class OfflineReplay:
    def __init__(self, options: LlmTrajOptions, replayer: Replayer) -> None:
        self._options = options
        self._replayer = replayer
        self._models: OfflineModels | None = None
        self._hosts: frozenset[str] = frozenset()
        self._kept: list = []  # the model-list answers record mode kept
        self._loaded_for: Replay | None = None  # the Replay the models are taken from

    def configure(self, updated: set[str]) -> None:
        replay = self._replayer.replay
        if replay is None:
            self._models = self._loaded_for = None
            return
        if replay is self._loaded_for:
            return
        try:
            kept = read_kept(models_file(self._options.settings.path))
        except ValueError as exc:  # the calls replay all the same; the lists come from them
            logger.warning(f"llm-traj: {exc}")
            kept = []
        self._kept, self._loaded_for = kept, replay
        self._models = None  # made of the recording when first needed: a pass over every session

    def _offline_models(self) -> OfflineModels:
        if self._models is None:
            replay = self._loaded_for
            self._models = OfflineModels(self._kept, replay.models)
            self._hosts = frozenset(urlsplit(url).hostname or "" for url in replay.urls)
        return self._models

    def _recorded_hosts(self) -> frozenset[str]:
        self._offline_models()
        return self._hosts

    def serves_flows(self) -> bool:
        return self._loaded_for is not None

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or self._loaded_for is None or llm_call(flow) is not None:
            return
        request = flow.request
        reverse = isinstance(flow.client_conn.proxy_mode, ReverseMode)
        if request.method == "GET" and model_list_path(request.path) is not None and (
            reverse or request.pretty_host in self._recorded_hosts()
        ):
            headers = {k.lower(): v for k, v in request.headers.items()}
            status, body = self._offline_models().answer(request.pretty_host, request.path, is_anthropic(headers))
            flow.response = http.Response.make(status, json.dumps(body), {"content-type": "application/json"})
        elif reverse and not self._replayer.forwards_misses:
            if request.path.split("?", 1)[0] in _PROBES and request.method in ("HEAD", "GET"):
                flow.response = http.Response.make(200, b"" if request.method == "HEAD" else b"llm-traj replay\n",
                                                   {"content-type": "text/plain"})  # fmt: skip
            else:
                message = (f"llm-traj replay: {request.method} {request.path} is not in the recording "
                           "(replay sends nothing to the upstream)")  # fmt: skip
                logger.info(message)
                flow.response = error_response(404, message, "invalid_request_error", "replay_not_recorded")
