"""Record mode: keeps the model-list answers it forwarded (`GET /v1/models`,
`/v1/models/{id}`) next to the trajectory, so that replay can answer them with
no upstream (`llmtraj.model_lists`). Written off the event loop."""

from __future__ import annotations

import asyncio
import json
import logging

from mitmproxy import http

from ..core.model_lists import KeptAnswer, is_anthropic, keep_answer, model_list_path, models_file
from .options import LlmTrajOptions

logger = logging.getLogger("llm_traj")


class ModelListKeeper:
    def __init__(self, options: LlmTrajOptions) -> None:
        self._options = options

    def serves_flows(self) -> bool:
        settings = self._options.settings
        return settings is not None and settings.mode == "record"

    def response(self, flow: http.HTTPFlow) -> None:
        request, response = flow.request, flow.response
        if request.method != "GET" or response.status_code != 200 or (found := model_list_path(request.path)) is None:
            return
        try:
            body = json.loads(response.get_content(strict=False) or b"")
        except ValueError:
            return
        headers = {k.lower(): v for k, v in request.headers.items()}
        answer = KeptAnswer(request.pretty_host, found[0], is_anthropic(headers), body)
        file = models_file(self._options.settings.path)

        def keep() -> None:
            try:
                keep_answer(file, answer)
            except (OSError, ValueError) as exc:
                logger.warning(f"llm-traj: could not keep the model list of {request.path}: {exc}")

        asyncio.get_running_loop().run_in_executor(None, keep)
