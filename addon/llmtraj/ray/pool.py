"""`ProxyPool`: n llm-traj proxies as Ray actors, one trainer in front of them.

    pool = ProxyPool(4, mode="anticall", path="/data/traj")
    handle = await pool.open_session()            # the least-loaded proxy
    start_agent(env=handle.env)                    # or base_url=handle.base_url
    async for call in pool.calls():               # held calls from every proxy
        await pool.respond(call, "Hello!")         # AntiCallClient's semantics
    records = await pool.records(handle.session_id)
    await pool.shutdown()

Sessions are kept in the pool: each lives on one proxy, chosen when it opens
(fewest open sessions). A proxy whose actor dies is restarted by Ray on the
same node if it can (soft affinity), with a new proxy over the same files;
its sessions end with a truthful error: its agents' held calls got a 503 and
their connections are gone, the trainer gets a `session_end` event saying so
(with `all_events`), and answers to their calls raise `AntiCallError` 410
`proxy_lost`. The pool looks at every actor every HEALTH_EVERY seconds, so a
restart is noticed though no call goes there (record mode has no event poll).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..anticall.client import AntiCallError, CallRef
from ..anticall.models import Event, PushResult
from ..cli.run import add_placeholder_keys, base_url_env
from ..core.record import CallRecord
from ..core.remote import check_url, default_stage, is_url
from ..core.session import validate_session
from .actor import ProxyActor

logger = logging.getLogger("llm_traj")

PLACEMENTS = ("spread", "pack")
MODES = ("record", "replay", "anticall")
POLL = 5.0  # seconds each proxy's event poll waits
HEALTH_EVERY = 2.0  # seconds between two looks at each proxy's actor (a restart is noticed within that)
REVIVE_WAIT = 120.0  # seconds a dead proxy's restart is waited for


@dataclass
class SessionHandle:
    """What an agent needs to reach its proxy: `base_url` for OpenAI SDK
    agents, `anthropic_base_url` for Anthropic's, or `env`, the variables
    `llm-traj run` would set (OPENAI_BASE_URL, ANTHROPIC_BASE_URL, ...)."""

    session_id: str
    base_url: str
    anthropic_base_url: str
    env: dict[str, str]
    proxy: int = 0  # which proxy of the pool serves it
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Proxy:
    index: int
    actor: Any  # the Ray actor handle
    info: dict[str, Any]
    sessions: set[str] = field(default_factory=set)  # open sessions
    held: set[str] = field(default_factory=set)  # call ids the trainer has been given and not answered
    restarts: int = 0
    gone: str | None = None  # why the actor is gone for good (Ray cannot restart it): it gets no new session

    @property
    def incarnation(self) -> str:
        return self.info["incarnation"]


@dataclass
class _Session:
    proxy: int
    incarnation: str
    metadata: dict[str, Any]
    lost: str | None = None  # why it ended with its proxy
    ended: bool = False


class ProxyPool:
    def __init__(
        self,
        n: int,
        mode: str = "anticall",
        path: str | os.PathLike = "trajectories",
        config: str | os.PathLike | None = None,
        placement: str | list[str] = "spread",
        *,
        upstream: str | None = None,
        options: dict[str, Any] | None = None,
        listen_host: str | None = None,
        stage: str | os.PathLike | None = None,
        num_cpus: float = 0.25,
        max_restarts: int = 4,
    ) -> None:
        """Start `n` proxies (mitmdump with the addon, each a Ray actor) in
        `mode`, writing trajectories under `path`: a directory on each node
        (proxy i writes `path/proxy-i/<session>.jsonl`), or an fsspec URL
        (`s3://bucket/prefix`: written to `stage/proxy-i/` on the node first,
        each session's file uploaded to `URL/<session>.jsonl` when it ends and
        at shutdown; `stage` defaults to ~/.llm-traj/stage/<hash of the URL>). `config` is the
        upstream config (llm_traj_config), `upstream` the reverse target of
        record mode, `options` more `--set` options. `placement`: `spread`
        (round robin over the cluster's alive nodes), `pack` (this node), or a
        list of node ids; each actor keeps to its node softly (restarted there
        if it can be). Proxies listen on their node's address as the cluster
        knows it (`listen_host` to choose)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if n < 1:
            raise ValueError(f"ProxyPool(n={n}): need at least one proxy")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {', '.join(MODES)}")
        if not ray.is_initialized():
            ray.init()
        self.mode = mode
        self.path = str(path)
        remote = str(path).rstrip("/") if is_url(path) else None
        if remote is not None:
            check_url(remote)
            directory = Path(stage).expanduser().resolve() if stage is not None else default_stage(remote)
        else:
            directory = Path(path).expanduser().resolve()
        sets = dict(options or {})
        if config is not None:
            sets["llm_traj_config"] = str(Path(config).expanduser().resolve())
        nodes = _nodes(placement, ray)
        actor_class = ray.remote(ProxyActor)
        self._proxies: list[_Proxy] = []
        handles = []
        for index in range(n):
            actor = actor_class.options(
                num_cpus=num_cpus,
                max_restarts=max_restarts,
                max_task_retries=0,
                max_concurrency=1000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[index % len(nodes)], soft=True),
            ).remote(index, mode, str(directory / f"proxy-{index}"), remote, sets, upstream, listen_host)
            handles.append(actor)
        infos = ray.get([actor.info.remote() for actor in handles])
        self._proxies = [_Proxy(i, actor, info) for i, (actor, info) in enumerate(zip(handles, infos))]
        self._sessions: dict[str, _Session] = {}
        self._events: asyncio.Queue[Event] | None = None
        self._session_events: dict[str, asyncio.Queue[Event]] = {}  # sessions that have a consumer of their own
        self._pumps: list[asyncio.Task] = []
        self._health: list[asyncio.Task] = []
        self._told: dict[str, dict[str, Any]] = {}  # the trainer's state as told to the proxies: path -> body
        self._closed = False

    # --- sessions ------------------------------------------------------------------

    async def open_session(self, session_id: str | None = None, metadata: dict[str, Any] | None = None) -> SessionHandle:
        """A new session on the least-loaded proxy (fewest open sessions)."""
        self._check_open()
        self._watch_health()
        session = session_id or f"s-{uuid.uuid4().hex[:16]}"
        validate_session(session)
        if session in self._sessions:
            raise ValueError(f"session {session!r} is already in this pool; give each episode its own id")
        alive = [p for p in self._proxies if p.gone is None]
        if not alive:
            raise RuntimeError("every proxy of this ProxyPool is gone for good (Ray could not restart them): "
                               "shut it down and start another")  # fmt: skip
        proxy = min(alive, key=lambda p: (len(p.sessions), len(p.held), p.index))
        proxy.sessions.add(session)
        self._sessions[session] = _Session(proxy.index, proxy.incarnation, dict(metadata or {}))
        url = proxy.info["url"]
        env = base_url_env(url, session)
        add_placeholder_keys(env)
        return SessionHandle(session, env["OPENAI_BASE_URL"], env["ANTHROPIC_BASE_URL"], env, proxy.index,
                             dict(metadata or {}))  # fmt: skip

    async def end_session(self, session_id: str, reason: str = "ended by the trainer") -> None:
        """End a session: its held calls get a 410, its later calls are refused
        (anti-call mode). Idempotent; a session lost with its proxy is over already."""
        state = self._session(session_id)
        proxy = self._proxies[state.proxy]
        proxy.sessions.discard(session_id)
        if state.ended or state.lost:
            state.ended = True
            return
        state.ended = True
        await self._ask(proxy, state, proxy.actor.end_session.remote(session_id, reason))

    async def records(self, session_id: str, timeout: float = 30.0) -> list[CallRecord]:
        """The session's records (with `tokens` when captured), once every call
        of it that got an answer is written."""
        state = self._session(session_id)
        proxy = self._proxies[state.proxy]
        return await proxy.actor.records.remote(session_id, timeout)

    # --- anti-call -----------------------------------------------------------------

    async def calls(
        self, *, session_id: str | None = None, all_events: bool = False, poll: float = POLL
    ) -> AsyncIterator[Event]:
        """The held calls of every proxy as they come (`Event`s of type
        `request`; with `all_events` also `cancelled` calls and `session_end`,
        including the end of sessions whose proxy died). Several consumers may
        iterate at once: each call goes to one of them.

        With `session_id`, only that session's calls (one consumer a session),
        which the other consumers then no longer get; the iteration ends with
        the session (after its `session_end`, with `all_events`)."""
        self._check_open()
        if self.mode != "anticall":
            raise RuntimeError(f"pool.calls(): the pool is in {self.mode} mode; calls are held in anticall mode only")
        state = self._session(session_id) if session_id is not None else None
        self._watch_health()
        if self._events is None:
            self._events = asyncio.Queue()
            self._pumps = [asyncio.ensure_future(self._pump(proxy, poll)) for proxy in self._proxies]
        if session_id is None:
            while True:
                event = await self._events.get()
                if event.type == "request" or all_events:
                    yield event
        if session_id in self._session_events:
            raise RuntimeError(f"pool.calls(session_id={session_id!r}): that session has a consumer already")
        queue = self._session_events[session_id] = asyncio.Queue()
        before = _take(self._events, lambda e: e.session == session_id)  # what came before this consumer
        for event in before:
            queue.put_nowait(event)
        # a session that ended sends its session_end (the proxy's, or the pool's when the proxy was lost); one
        # that ended before this consumer came may have sent it to another
        over = (state.ended or state.lost) and not any(e.type == "session_end" for e in before)
        try:
            while not (over and queue.empty()):
                event = await queue.get()
                if event.type == "request" or all_events:
                    yield event
                if event.type == "session_end":
                    return
        finally:
            del self._session_events[session_id]
            while not queue.empty():  # (none but a late session_end) back to the other consumers
                self._events.put_nowait(queue.get_nowait())

    async def respond(self, call: CallRef, response: str | dict[str, Any] | None = None, **kwargs) -> PushResult:
        """Answer a held call: text or a full response object, or `text=`,
        `tool_calls=`, `finish_reason=`, `usage=`, `extra=` (AntiCallClient.send_response)."""
        return await self._push(call, "send_response", (response,), kwargs, final=True)

    async def delta(self, call: CallRef, text: str | None = None, **kwargs) -> PushResult:
        """Stream a delta to the agent (AntiCallClient.send_delta); then `finish`."""
        return await self._push(call, "send_delta", (text,), kwargs, final=False)

    async def finish(self, call: CallRef, **kwargs) -> PushResult:
        return await self._push(call, "finish", (), kwargs, final=True)

    async def error(self, call: CallRef, message: str, status: int = 500, **kwargs) -> PushResult:
        """Answer a call with an error (AntiCallClient.send_error)."""
        return await self._push(call, "send_error", (message, status), kwargs, final=True)

    async def _push(self, call: CallRef, what: str, args: tuple, kwargs: dict[str, Any], final: bool) -> PushResult:
        call_id = call if isinstance(call, str) else call.id
        session = call_id.rpartition(":")[0]
        state = self._session(session)
        proxy = self._proxies[state.proxy]
        if state.lost:
            raise AntiCallError(410, "proxy_lost", f"call {call_id}: {state.lost}")
        result = await self._ask(proxy, state, proxy.actor.push.remote(what, call_id, args, kwargs))
        if final:
            proxy.held.discard(call_id)
        return result

    # --- the trainer's policy ------------------------------------------------------

    def set_weight_version(self, version: str | int | None) -> None:
        """Every call that comes in afterwards, on every proxy, carries `version` in its record."""
        self._tell_all("/llm-traj/weight-version", {"version": version})

    def pause(self, retry_after: float = 5.0) -> None:
        """New calls wait while weights sync: held in anti-call mode, answered
        503 with `Retry-After` otherwise. Calls already held stay held."""
        self._tell_all("/llm-traj/pause", {"retry_after": retry_after})

    def resume(self) -> None:
        self._tell_all("/llm-traj/resume", {})

    def _tell_all(self, path: str, body: dict[str, Any]) -> None:
        import ray

        self._check_open()
        if path == "/llm-traj/resume":
            self._told.pop("/llm-traj/pause", None)
        else:
            self._told[path] = body  # what a restarted proxy is told again
        ray.get([proxy.actor.training.remote(path, body) for proxy in self._proxies if proxy.gone is None])

    # --- the pool ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per proxy: its node, address, open sessions, the held calls given to
        the trainer and not yet answered, how often it was restarted, and why
        it is gone for good (None while it serves)."""
        proxies = [
            {"index": p.index, "node_id": p.info["node_id"], "url": p.info["url"], "sessions": len(p.sessions),
             "held": len(p.held), "restarts": p.restarts, "gone": p.gone}
            for p in self._proxies
        ]  # fmt: skip
        return {
            "proxies": proxies,
            "sessions": sum(p["sessions"] for p in proxies),
            "held": sum(p["held"] for p in proxies),
            "lost_sessions": sum(1 for s in self._sessions.values() if s.lost),
        }

    async def shutdown(self) -> None:
        """Stop every proxy (held calls get a 503, every call is written) and its actor."""
        import ray

        if self._closed:
            return
        self._closed = True
        for task in self._pumps + self._health:
            task.cancel()
        serving = [p for p in self._proxies if p.gone is None]
        results = await asyncio.gather(*(p.actor.shutdown.remote() for p in serving), return_exceptions=True)
        for proxy, result in zip(serving, results):
            if isinstance(result, Exception):
                logger.error(f"llm-traj: proxy {proxy.index} did not stop cleanly: {result}")
        for proxy in self._proxies:
            ray.kill(proxy.actor, no_restart=True)

    # --- internals -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ProxyPool was shut down")

    def _session(self, session_id: str) -> _Session:
        state = self._sessions.get(session_id)
        if state is None:
            raise KeyError(f"session {session_id!r} was not opened in this pool")
        return state

    async def _ask(self, proxy: _Proxy, state: _Session, ref) -> Any:
        """The result of an actor call for a session; a dead or restarted proxy ends the session truthfully."""
        from ray.exceptions import RayActorError

        try:
            return await ref
        except RayActorError as exc:
            await self._revive(proxy, type(exc).__name__)
        if state.lost is not None:
            raise AntiCallError(410, "proxy_lost", state.lost)
        raise AntiCallError(503, "proxy_unavailable", f"proxy {proxy.index} was unreachable for a moment; try again")

    async def _pump(self, proxy: _Proxy, poll: float) -> None:
        from ray.exceptions import RayActorError

        while True:
            try:
                incarnation, events = await proxy.actor.next_events.remote(poll)
            except RayActorError as exc:
                await self._revive(proxy, type(exc).__name__)
                continue
            if incarnation != proxy.incarnation:  # restarted between two polls
                await self._revive(proxy, "restarted")
            for event in events:
                state = self._sessions.get(event.session)
                if state is not None and state.lost:
                    continue  # a call of a session its proxy lost: nobody can answer it
                if event.type == "request":
                    proxy.held.add(event.id)
                elif event.type == "cancelled":
                    proxy.held.discard(event.id)
                elif event.type == "session_end":
                    proxy.held = {c for c in proxy.held if c.rpartition(":")[0] != event.session}
                self._deliver(event)

    def _deliver(self, event: Event) -> None:
        """To the session's own consumer if it has one, else to the others."""
        queue = self._session_events.get(event.session, self._events)
        if queue is not None:
            queue.put_nowait(event)

    def _watch_health(self) -> None:
        """Look at every proxy's actor every HEALTH_EVERY seconds, so a restart
        is noticed (its sessions end, new ones go to the new proxy) though no
        call went to it; started by the first coroutine that needs it."""
        if not self._health:
            self._health = [asyncio.ensure_future(self._look_after(proxy)) for proxy in self._proxies]

    async def _look_after(self, proxy: _Proxy) -> None:
        from ray.exceptions import RayActorError

        while True:
            await asyncio.sleep(HEALTH_EVERY)
            try:
                info = await proxy.actor.info.remote()
            except RayActorError as exc:
                why = type(exc).__name__
            else:
                if info["incarnation"] == proxy.incarnation:
                    continue
                why = "restarted"
            try:
                await self._revive(proxy, why)
            except RayActorError:
                proxy.gone = f"died ({why}) and could not be restarted"
                logger.error(f"llm-traj: proxy {proxy.index} is gone for good; its sessions ended, new ones go to the others")
                return

    async def _revive(self, proxy: _Proxy, why: str) -> None:
        """The proxy's actor died or restarted: end its sessions and wait for the new proxy."""
        import ray
        from ray.exceptions import RayActorError

        loop = asyncio.get_running_loop()
        deadline = loop.time() + REVIVE_WAIT
        while True:
            try:
                info = await proxy.actor.info.remote()
                if info["incarnation"] != proxy.incarnation:  # told before a session goes there: it starts afresh
                    for path, body in list(self._told.items()):
                        await proxy.actor.training.remote(path, body)
                break
            except RayActorError as exc:
                if loop.time() > deadline or isinstance(exc, ray.exceptions.ActorDiedError) and _gone_for_good(exc):
                    self._lose_sessions(proxy, f"died ({why}) and could not be restarted")
                    raise
                await asyncio.sleep(0.5)
        if info["incarnation"] != proxy.incarnation:  # (not noticed meanwhile by another of our tasks)
            proxy.info = info
            proxy.restarts += 1
            logger.warning(f"llm-traj: proxy {proxy.index} restarted ({why}); now {info['url']}")
            self._lose_sessions(proxy, f"died ({why}) and was restarted", survivor=proxy.incarnation)

    def _lose_sessions(self, proxy: _Proxy, what: str, survivor: str | None = None) -> None:
        """End the proxy's sessions but those of the `survivor` incarnation (a restarted proxy's own)."""
        for session in list(proxy.sessions):
            state = self._sessions[session]
            if state.incarnation == survivor or state.lost:
                continue
            state.lost = f"session {session}: its proxy {proxy.index} {what}; its agent's calls failed"
            proxy.sessions.discard(session)
            self._deliver(Event(type="session_end", session=session, reason=state.lost))
        proxy.held.clear()


def _take(queue: asyncio.Queue, which) -> list:
    """Take the items `which` says out of the queue, leaving the others in order."""
    items = [queue.get_nowait() for _ in range(queue.qsize())]
    for item in items:
        if not which(item):
            queue.put_nowait(item)
    return [item for item in items if which(item)]


def _gone_for_good(exc: Exception) -> bool:
    return "max_restarts" in str(exc) or "ray.kill" in str(exc)


def _nodes(placement: str | list[str], ray) -> list[str]:
    if isinstance(placement, list):
        if not placement:
            raise ValueError("placement: an empty list of node ids")
        return placement
    if placement == "pack":
        return [ray.get_runtime_context().get_node_id()]
    if placement != "spread":
        raise ValueError(f"placement={placement!r}: use {' or '.join(PLACEMENTS)}, or a list of node ids")
    alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    return alive or [ray.get_runtime_context().get_node_id()]
