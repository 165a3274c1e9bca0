"""Trajectories to object storage (`llm_traj_path` an fsspec URL): the recorder
writes to the stage directory as ever; each session's file goes up when the
session ends (anti-call: however it is ended; any mode: `POST
/llm-traj/upload?session=S`, with the control token) and at shutdown, once its calls are written. An
upload that fails is logged and retried (with backoff, and at the next start
over the same stage directory); the file stays on disk meanwhile.

Uploads run in a thread: the event loop never waits for the network.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from mitmproxy import http

from ..core.remote import Uploader
from ..core.session import InvalidSession, validate_session
from .access import ControlAccess
from .endpoints import json_response
from .options import LlmTrajOptions
from .recording import Recorder
from .routing import error_response

logger = logging.getLogger("llm_traj")

UPLOAD_PATH = "/llm-traj/upload"
WRITTEN_WAIT = 60.0  # seconds a session's calls are waited for before its file goes up anyway
RETRY_FIRST, RETRY_MAX = 1.0, 60.0
SHUTDOWN_BUDGET = 8.0  # seconds spent uploading at shutdown (within a stopping proxy's 10 s); the rest at the next start


class Uploading:
    def __init__(self, options: LlmTrajOptions, recorder: Recorder, access: ControlAccess) -> None:
        self._options = options
        self._access = access
        self._recorder = recorder
        self._uploader: Uploader | None = None
        self._failed: dict[str, float] = {}  # session -> retry delay
        self._retrying: asyncio.Task | None = None
        self._busy: dict[str, asyncio.Task] = {}

    def configure(self, updated: set[str]) -> None:
        settings = self._options.settings
        # replay reads the URL (from a local copy) and never writes to it
        remote = settings.remote if settings is not None and settings.mode != "replay" else None
        if self._uploader is not None and (remote, settings.path if settings else None) == (self._uploader.url, self._uploader.stage):
            return
        self._uploader = Uploader(remote, settings.path) if remote is not None else None
        self._failed.clear()

    def running(self) -> None:
        if self._uploader is not None:
            leftover = self._uploader.pending()
            if leftover:
                logger.info(f"llm-traj: {len(leftover)} session file(s) not uploaded to {self._uploader.url} yet; uploading")
                for session in leftover:
                    self.session_ended(session)

    def serves_flows(self) -> bool:
        return self._uploader is not None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not flow.request.path.startswith(UPLOAD_PATH):
            return
        if flow.request.path.split("?", 1)[0] != UPLOAD_PATH or not self._access.check(flow):
            return
        session = flow.request.query.get("session", "")
        try:
            validate_session(session)
        except InvalidSession as exc:
            flow.response = error_response(400, f"llm-traj: {UPLOAD_PATH}?session=S: {exc}", "invalid_request_error",
                                           "bad_upload_query")  # fmt: skip
            return
        self.session_ended(session)
        flow.response = json_response(202, {"session": session, "url": f"{self._uploader.url}/{session}.jsonl"})

    def session_ended(self, session: str) -> None:
        """Upload the session's file once its calls are written (a broker listener too)."""
        if self._uploader is None or session in self._busy:
            return
        task = self._busy[session] = asyncio.ensure_future(self._upload(session))
        task.add_done_callback(lambda _: self._busy.pop(session, None))

    def call_opened(self, call) -> None:  # broker listener: nothing to do when a call comes
        pass

    async def _upload(self, session: str) -> None:
        uploader = self._uploader
        await self._recorder.written(session, WRITTEN_WAIT)
        try:
            size = await asyncio.to_thread(uploader.upload, session)
        except Exception as exc:  # the store's errors are its own types: keep the file, retry
            delay = min(self._failed.get(session, RETRY_FIRST / 2) * 2, RETRY_MAX)
            self._failed[session] = delay
            logger.error(f"llm-traj: could not upload session {session} to {uploader.url} ({exc!r}); kept at "
                         f"{uploader.stage / (session + '.jsonl')}, retrying in {delay:g} s")  # fmt: skip
            if self._retrying is None or self._retrying.done():
                self._retrying = asyncio.ensure_future(self._retry())
            return
        if self._failed.pop(session, None) is not None:
            logger.info(f"llm-traj: uploaded session {session} to {uploader.url} ({size} bytes) after a failure")

    async def _retry(self) -> None:
        while self._failed:
            await asyncio.sleep(min(self._failed.values()))
            for session in list(self._failed):
                self.session_ended(session)
            await asyncio.gather(*list(self._busy.values()), return_exceptions=True)

    def done(self) -> None:
        """At shutdown (after the recorder wrote everything): upload what changed
        since, for at most SHUTDOWN_BUDGET seconds (a store that is down can
        take long to say so); what is left goes up at the next start over the stage."""
        if self._uploader is None:
            return
        if self._retrying is not None:
            self._retrying.cancel()
        uploader, sessions, failures = self._uploader, self._uploader.pending(), []

        def upload_all() -> None:
            for session in sessions:
                try:
                    uploader.upload(session)
                except Exception as exc:  # the store's errors are its own types
                    failures.append(f"{session} ({exc!r})")

        worker = threading.Thread(target=upload_all, name="llm-traj-upload", daemon=True)
        worker.start()
        worker.join(SHUTDOWN_BUDGET)
        for failure in failures:
            logger.error(f"llm-traj: could not upload session {failure} to {uploader.url}; kept in {uploader.stage}, "
                         "uploaded at the next start over it")  # fmt: skip
        if worker.is_alive():
            left = len(uploader.pending())
            logger.error(f"llm-traj: out of time uploading to {uploader.url}: {left} session file(s) kept in "
                         f"{uploader.stage}, uploaded at the next start over it")  # fmt: skip
