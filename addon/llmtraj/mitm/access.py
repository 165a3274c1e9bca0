"""The proxy's control token: one per proxy process, the bearer token of the
anti-call control API and of the proxy's own endpoints that change its state
(the trainer's `PUT /llm-traj/weight-version`, `POST /llm-traj/pause` and
`/llm-traj/resume`, `POST /llm-traj/upload`, `PUT /llm-traj/prompt`). The
proxy's port is what agents reach (from a sandbox, say): without the token they
cannot pause the proxy, stamp calls with another policy version, upload a
session early or pick their own system prompt.

The token is in the control file (`<llm_traj_path>/control.json`, a URL's
stage directory's, readable by its owner only) in every mode, with the control API's address in anti-call
mode (`url` null otherwise); the file goes when the proxy stops. In replay
mode the recording may be read-only: a control file that cannot be written
there is logged, and the endpoints then refuse every request.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mitmproxy import exceptions, http

from ..anticall.control import authorized
from ..anticall.control_file import control_file_for, remove_control_file, write_control_file
from ..anticall.models import ControlInfo
from .anticalling import AntiCalling
from .options import LlmTrajOptions
from .routing import error_response

logger = logging.getLogger("llm_traj")


class ControlAccess:
    def __init__(self, options: LlmTrajOptions, anticalling: AntiCalling, token: str) -> None:
        self._options = options
        self._anticalling = anticalling  # its control API has the same token
        self.token = token
        self._written: tuple[Path, str | None] | None = None  # the control file written, and the url in it

    def configure(self, updated: set[str]) -> None:
        # after AntiCalling's: the control API listens by now
        if not any(name.startswith("llm_traj_") for name in updated):
            return
        settings = self._options.settings
        wanted = (control_file_for(settings.control_dir), self._anticalling.control_url) if settings is not None else None
        if wanted == self._written:
            return
        self._remove()
        if wanted is None:
            return
        try:
            write_control_file(wanted[0], ControlInfo(url=wanted[1], token=self.token, pid=os.getpid()))
        except OSError as exc:
            if settings.mode != "replay":
                raise exceptions.OptionsError(f"cannot write the control file {wanted[0]}: {exc}") from None
            logger.warning(f"llm-traj: cannot write the control file {wanted[0]} ({exc}); the trainer endpoints "
                           "refuse every request")  # fmt: skip
            return
        self._written = wanted

    def done(self) -> None:
        self._remove()

    def check(self, flow: http.HTTPFlow) -> bool:
        """Whether the request carries the token; if not, it is answered 401."""
        if self._written is not None and authorized(flow.request.headers.get("authorization", ""), self.token):
            return True
        path = flow.request.path.split("?", 1)[0]
        flow.response = error_response(401, f"llm-traj: {flow.request.method} {path} needs the proxy's control token: "
                                       "send Authorization: Bearer <token> (see the control file)",
                                       "invalid_request_error", "unauthorized")  # fmt: skip
        return False

    def _remove(self) -> None:
        if self._written is not None:
            remove_control_file(self._written[0], self.token)
            self._written = None
