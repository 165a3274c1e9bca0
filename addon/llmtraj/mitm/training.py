"""What an RL trainer tells the proxy about its policy, on the proxy's own endpoints:

- `PUT /llm-traj/weight-version` `{"version": V}` (a string or an integer; `null`
  clears it): every call that comes in afterwards carries it in its record
  (`weight_version`); `GET` says what it is;
- `POST /llm-traj/pause` (`{"retry_after": S}`, default 5): new LLM calls wait
  while the trainer syncs weights: in anti-call mode they are held (and reach
  the drivers on resume); in the other modes they are answered `503` with
  `Retry-After: S`, in the API's error shape;
- `POST /llm-traj/resume`: calls flow again; the held ones go on.

The `PUT` and `POST`s need the proxy's control token (`mitm.access`; 401
without it): an agent reaching the proxy must not pause it or change the version.

`llmtraj.ray.ProxyPool.set_weight_version`, `pause` and `resume` call these
on every proxy of a pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

from mitmproxy import http

from .access import ControlAccess
from .endpoints import json_response
from .options import LlmTrajOptions
from .routing import CALL_KEY, error_response, llm_call

logger = logging.getLogger("llm_traj")

WEIGHT_VERSION_PATH = "/llm-traj/weight-version"
PAUSE_PATH = "/llm-traj/pause"
RESUME_PATH = "/llm-traj/resume"
DEFAULT_RETRY_AFTER = 5.0
_ENDPOINT_KEY = "llm_traj_training"  # flow.metadata: which of the endpoints above a request is for



def _bad(message: str) -> http.Response:
    return error_response(400, f"llm-traj: {message}", "invalid_request_error", "bad_training_request")


class TrainerControls:
    def __init__(self, options: LlmTrajOptions, access: ControlAccess) -> None:
        self._options = options
        self._access = access
        self.weight_version: str | int | None = None
        self._retry_after = DEFAULT_RETRY_AFTER
        self._resumed: asyncio.Event | None = None  # set while calls flow; None: never paused

    @property
    def paused(self) -> bool:
        return self._resumed is not None and not self._resumed.is_set()

    def state(self) -> dict:
        return {"weight_version": self.weight_version, "paused": self.paused, "retry_after": self._retry_after}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or self._options.settings is None:
            return
        info = flow.metadata.get(CALL_KEY)
        if info is None:
            path = flow.request.path.split("?", 1)[0]
            if path in (WEIGHT_VERSION_PATH, PAUSE_PATH, RESUME_PATH):
                self._endpoint(flow, path)
            return
        if self.weight_version is not None:
            info["weight_version"] = self.weight_version
        if self.paused and self._options.settings.mode != "anticall":
            response = error_response(503, "llm-traj: the trainer is syncing its weights; retry shortly", "server_error",
                                      "paused", llm_call(flow).api)  # fmt: skip
            response.headers["retry-after"] = str(math.ceil(self._retry_after))
            flow.response = response

    def request(self, flow: http.HTTPFlow):
        if flow.response is not None:
            return None
        if (path := flow.metadata.pop(_ENDPOINT_KEY, None)) is not None:
            self._answer(flow, path)
        elif self.paused and CALL_KEY in flow.metadata:
            return self._resumed.wait()  # anti-call: held until resume (the other modes answered 503)
        return None

    def _endpoint(self, flow: http.HTTPFlow, path: str) -> None:
        method = flow.request.method
        if path == WEIGHT_VERSION_PATH and method == "GET":
            flow.response = json_response(200, self.state())
            return
        if method not in ("PUT", "POST"):
            flow.response = error_response(405, f"llm-traj: {method} {path}: use {'PUT' if path == WEIGHT_VERSION_PATH else 'POST'}",
                                           "invalid_request_error", "method_not_allowed")  # fmt: skip
            return
        if self._access.check(flow):
            flow.metadata[_ENDPOINT_KEY] = path  # answered in `request`, with the body

    def _answer(self, flow: http.HTTPFlow, path: str) -> None:
        try:
            body = json.loads(flow.request.get_content(strict=False) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            flow.response = _bad(f"{path}: the body is not a JSON object ({exc})")
            return
        if path == WEIGHT_VERSION_PATH:
            if "version" not in body:
                flow.response = _bad(f'{path}: give {{"version": V}} (a string, an integer, or null)')
                return
            version = body["version"]
            if not (version is None or isinstance(version, str) or (isinstance(version, int) and not isinstance(version, bool))):
                flow.response = _bad(f"{path}: version {version!r} is not a string, an integer or null")
                return
            self.weight_version = version
            logger.info(f"llm-traj: weight version {version!r}")
        elif path == PAUSE_PATH:
            retry_after = body.get("retry_after", DEFAULT_RETRY_AFTER)
            if not (isinstance(retry_after, int | float) and not isinstance(retry_after, bool) and 0 <= retry_after <= 3600):
                flow.response = _bad(f"{path}: retry_after {retry_after!r} is not a number of seconds (0-3600)")
                return
            self._retry_after = float(retry_after)
            if not self.paused:
                self._resumed = asyncio.Event()
                logger.info("llm-traj: paused: new calls wait for resume")
        elif self.paused:
            self._resumed.set()
            logger.info("llm-traj: resumed")
        flow.response = json_response(200, self.state())
