"""One proxy of a `ProxyPool`: a Ray actor that runs mitmdump with the addon as
a child process on its node and speaks for it (the control API, the proxy's
own endpoints, its trajectory files).

The mitmdump is started from a thread that lives as long as it does, with the
parent-death signal set: when the actor process dies (even by SIGKILL) its
proxy gets SIGTERM, answers its held calls with a 503, writes what it has and
exits, so no agent hangs on a proxy whose owner is gone. Ray then restarts the
actor, which starts a new proxy on a new port over the same trajectory files.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx

from ..anticall.client import AntiCallClient
from ..anticall.control_file import control_file_for, read_control_file
from ..anticall.models import Event
from ..cli.proxy_process import ProxyProcess
from ..cli.run import COMMAND_DEFAULTS
from ..core.record import CallRecord
from ..upstreams.config import NO_UPSTREAM

EVENT_BATCH = 256  # events handed to the pool per call at most
START_TIMEOUT = 60.0


class ProxyStartFailed(RuntimeError):
    pass


class ProxyActor:
    def __init__(
        self,
        index: int,
        mode: str,
        directory: str,
        remote: str | None,
        options: dict[str, Any],
        upstream: str | None,
        listen_host: str | None,
    ) -> None:
        import ray

        self.index = index
        self.mode = mode
        self.incarnation = uuid.uuid4().hex[:12]
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = listen_host or _node_address(ray, self.node_id)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.remote = remote
        where = {"llm_traj_path": str(self.directory)}
        if remote is not None:  # written here first, each session's file uploaded to the URL when it ends
            where = {"llm_traj_path": remote, "llm_traj_stage": str(self.directory)}
        all_options = {**COMMAND_DEFAULTS, "llm_traj_mode": mode, **where, **options}
        target = upstream or (None if all_options.get("llm_traj_config") and mode == "record" else NO_UPSTREAM)
        self._proxy = ProxyProcess(
            upstream=target, options=all_options, listen_host=self.host, log=self.directory / "proxy.log",
            die_with_parent=True,
        )  # fmt: skip
        self._start_proxy()
        self.url = f"http://{self.host}:{self._proxy.port}"
        info = read_control_file(control_file_for(self.directory))
        self._token = info.token  # for the proxy's trainer endpoints too
        self._control = AntiCallClient(info.url, info.token) if mode == "anticall" else None
        self._events: asyncio.Queue[Event] | None = None
        self._pump: asyncio.Task | None = None
        self._http: httpx.AsyncClient | None = None

    def _start_proxy(self) -> None:
        """Start mitmdump from a thread that waits for it to exit: the thread's
        end is what the parent-death signal watches."""
        started = threading.Event()
        failure: list[BaseException] = []

        def keep() -> None:
            try:
                self._proxy.start(START_TIMEOUT)
            except BaseException as exc:  # reported to the constructor
                failure.append(exc)
                started.set()
                return
            started.set()
            self._proxy.wait()

        threading.Thread(target=keep, name=f"llm-traj-proxy-{self.index}", daemon=True).start()
        started.wait()
        if failure:
            raise ProxyStartFailed(f"llm-traj proxy {self.index} did not start: {failure[0]}")

    # --- what the pool asks ------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "index": self.index, "incarnation": self.incarnation, "url": self.url, "node_id": self.node_id,
            "pid": os.getpid(), "proxy_pid": self._proxy.pid, "directory": str(self.directory),
        }  # fmt: skip

    async def next_events(self, timeout: float) -> tuple[str, list[Event]]:
        """(this proxy's incarnation, the next events of its control API: what
        came within `timeout` seconds, at most EVENT_BATCH of them)."""
        if self._control is None:
            raise RuntimeError(f"proxy {self.index} is in {self.mode} mode: only anti-call mode holds calls")
        if self._pump is None:
            self._events = asyncio.Queue()
            self._pump = asyncio.ensure_future(self._pump_events())
        events: list[Event] = []
        try:
            events.append(await asyncio.wait_for(self._events.get(), timeout))
        except TimeoutError:
            return self.incarnation, events
        while len(events) < EVENT_BATCH and not self._events.empty():
            events.append(self._events.get_nowait())
        return self.incarnation, events

    async def _pump_events(self) -> None:
        while True:
            event = await self._control.get_request(timeout=30.0)
            if event is not None:
                self._events.put_nowait(event)

    async def push(self, what: str, call_id: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """An answer to a held call: `what` is send_response, send_delta, finish or send_error (AntiCallClient's)."""
        if what not in ("send_response", "send_delta", "finish", "send_error"):
            raise ValueError(f"not an answer: {what}")
        return await getattr(self._control, what)(call_id, *args, **kwargs)

    async def end_session(self, session: str, reason: str) -> None:
        """End the session (anti-call); its file goes up to the URL, if the pool has one."""
        if self._control is not None:
            await self._control.end_session(session, reason)  # the proxy uploads an ended session itself
        elif self.remote is not None:
            answer = await self._proxy_request("POST", "/llm-traj/upload", params={"session": session})
            if answer.status_code != 202:
                raise RuntimeError(f"proxy {self.index}: {_message(answer)}")

    async def held(self) -> int:
        return len(await self._control.calls()) if self._control is not None else 0

    async def records(self, session: str, timeout: float) -> list[CallRecord]:
        """The session's records, once every call of it that got an answer is written."""
        return await asyncio.to_thread(self._proxy.written_records, session, self.directory, timeout)

    async def training(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT/POST to the proxy's trainer endpoints (`mitm.training`)."""
        method = "PUT" if path.endswith("weight-version") else "POST"
        answer = await self._proxy_request(method, path, json=body)
        if answer.status_code != 200:
            raise ValueError(f"proxy {self.index}: {_message(answer)}")
        return answer.json()

    async def _proxy_request(self, method: str, path: str, timeout: float = 30.0, **kwargs) -> httpx.Response:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.url, trust_env=False,
                                           headers={"Authorization": f"Bearer {self._token}"})  # fmt: skip
        return await self._http.request(method, path, timeout=timeout, **kwargs)

    async def shutdown(self) -> None:
        """Stop the proxy (held calls get a 503, everything is written)."""
        if self._pump is not None:
            self._pump.cancel()
        if self._control is not None:
            await self._control.aclose()
        if self._http is not None:
            await self._http.aclose()
        await asyncio.to_thread(self._proxy.stop, 30.0)


def _message(answer: httpx.Response) -> str:
    try:
        return answer.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {answer.status_code}: {answer.text[:200]}"


def _node_address(ray, node_id: str) -> str:
    """The address the cluster knows this node by (ray.init's _node_ip_address, a node's --node-ip-address)."""
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()
