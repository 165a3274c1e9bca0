"""What the driver-side commands do: `llm-traj anti-call` (ROCK's
`anti-call-llm` semantics over the control API) and `llm-traj watch-agent`
(end a session the moment the agent's process exits)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from .client import AntiCallClient, AntiCallError
from .control_file import control_file_for
from .models import DEFAULT_POLL, Event, SessionInfo

SESSION_END = "SESSION_END"
T = TypeVar("T")


class UsageError(ValueError):
    pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    return True


def connect(control_file: Path | None, control: str | None, token: str | None) -> AntiCallClient:
    """The client for `--control-file F`, or `--control URL --token T`."""
    if control:
        if not token:
            raise UsageError("--control URL needs --token T (the token is in the proxy's control file)")
        return AntiCallClient(control, token)
    if control_file is None:
        raise UsageError(
            "say where the proxy is: --control-file F (the proxy writes <llm_traj_path>/control.json) "
            "or --control URL --token T"
        )
    return AntiCallClient.from_control_file(control_file)


async def using(client: AntiCallClient, work: Callable[[AntiCallClient], Awaitable[T]]) -> T:
    async with client:
        return await work(client)


def parse_response(text: str) -> str | dict[str, Any]:
    """A `--response`: a JSON object (a full response) or a JSON string (the reply text)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(
            f"the response is not JSON ({exc}); give a full response object in the call's API shape "
            "(a chat.completion, a Message, ...) or a JSON string (the reply text)"
        ) from None
    if not isinstance(value, dict | str):
        raise UsageError(
            "the response must be a JSON object (a full response in the call's API shape) or a JSON string (the reply text)"
        )
    return value


async def anti_call(
    client: AntiCallClient,
    session: str,
    index: int,
    response: str | dict[str, Any] | None,
    timeout: float = 0.0,
    warn: Callable[[str], None] = print,
) -> str:
    """Answer call `index` of `session` (none for index 0), then wait for call
    `index + 1`: its request as one line of JSON, or SESSION_END. Pushing the
    same index again is ignored by the proxy."""
    if index < 0:
        raise UsageError("--index is 0 (wait for the first call) or the number of the call to answer, from 1")
    if index == 0 and response is not None:
        raise UsageError("--index 0 only waits for the first call; answer call N with --index N --response ...")
    if index > 0:
        if response is None:
            raise UsageError(f"--index {index} answers call {index}: give --response JSON or --response-file F")
        try:
            await client.send_response(f"{session}:{index}", response)
        except AntiCallError as exc:
            if exc.status != 410:
                raise
            warn(f"llm-traj: call {index} was not answered: {exc.message}")
    event = await wait_call(client, session, index + 1, timeout)
    return SESSION_END if event.session_end else json.dumps(event.request)


async def wait_call(client: AntiCallClient, session: str, index: int, timeout: float = 0.0) -> Event:
    """Call `index` of `session` or its end, waiting up to `timeout` s (0: no limit)."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while True:
        step = DEFAULT_POLL if deadline is None else max(0.0, min(DEFAULT_POLL, deadline - time.monotonic()))
        event = await client.wait_call(session, index, step)
        if event is not None:
            return event
        if deadline is not None and time.monotonic() >= deadline:
            raise AntiCallError(0, "timeout", f"no call {index} of session {session!r} within {timeout:g} s")


def wait_for_exit(pid: int) -> None:
    """Return when process `pid` has exited (at once if there is none): on
    Linux through a pidfd, with no polling; elsewhere by looking every 50 ms."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while pid_alive(pid):
            time.sleep(0.05)
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def end_session(traj: Path, session: str, reason: str) -> SessionInfo:
    """End a session of the proxy recording to `traj` (through its control file)."""
    client = AntiCallClient.from_control_file(control_file_for(traj))
    return asyncio.run(using(client, lambda c: c.end_session(session, reason)))


async def watch_agent(client: AntiCallClient, pid: int, session: str) -> SessionInfo:
    """End `session` the moment process `pid` exits (for `llm-traj watch-agent`
    and wrappers that start the agent)."""
    await client.sessions()  # the proxy must be reachable before we wait
    await asyncio.to_thread(wait_for_exit, pid)
    return await client.end_session(session, f"agent process {pid} exited")
