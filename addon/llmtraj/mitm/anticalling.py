"""Anti-call mode: every LLM call is held (no upstream connection) and handed
to drivers through `llmtraj.anticall.Broker`; their answer goes back to the
agent through the loopback server, so the recorder (before this addon) tees
it like an upstream response.

While a call is held, mitmproxy's idle timeout (600 s: TCP_TIMEOUT in 11, `tcp_timeout` in 12, which
would cut the agent's connection) is disarmed for that connection only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import command, ctx, exceptions, http

from ..anticall.broker import Broker, BrokerError, Failure, Listener
from ..anticall.control import ControlServer
from ..anticall.control_file import control_file_for
from ..anticall.respond import Answer, answer, error_answer
from ..anticall.rockfile import RockFileChannel
from ..core.redact import redact_fields
from ..core.session import InvalidSession, validate_session
from .connections import disarm_idle_timeout
from .loopback import Loopback, ProducedResponse
from .options import LlmTrajOptions, Settings, seconds_option
from .routing import CALL_KEY, CallMetadata, llm_call

logger = logging.getLogger("llm_traj")

CALL_ID_KEY = "anticall_id"  # in flow.metadata["llm_traj"]
_DEFAULTS = {"llm_traj_control_port": 0, "llm_traj_control_host": "127.0.0.1", "llm_traj_hold_timeout": "0",
             "llm_traj_rock_file": ""}  # fmt: skip


@dataclass(frozen=True)
class AntiCallSettings:
    control_port: int
    control_host: str
    hold_timeout: float
    rock_file: str
    control_file: Path


class AntiCalling:
    def __init__(self, options: LlmTrajOptions, loopback: Loopback, token: str) -> None:
        self._options = options
        self._loopback = loopback
        self._token = token  # the control API's; `mitm.access` writes it to the control file
        self._settings: AntiCallSettings | None = None
        self.broker: Broker | None = None
        self._control: ControlServer | None = None
        self._rock: RockFileChannel | None = None
        self.listeners: list[Listener] = []  # added to every broker made (the uploader: sessions that end)
        loopback.at_stop(self._stop_broker)

    def load(self, loader) -> None:
        loader.add_option(
            "llm_traj_control_port", int, _DEFAULTS["llm_traj_control_port"],
            "Anti-call: port of the control API on 127.0.0.1 (0: any free port). The address and its token "
            "are written to <llm_traj_path>/control.json.",
        )
        loader.add_option(
            "llm_traj_control_host", str, _DEFAULTS["llm_traj_control_host"],
            "Anti-call: the address the control API listens on (a trainer on another node: this node's address); "
            "every request still needs the token of the control file.",
        )
        loader.add_option(
            "llm_traj_hold_timeout", str, _DEFAULTS["llm_traj_hold_timeout"],
            "Anti-call: seconds a call waits for the driver (for its answer, and between streamed deltas) "
            "before the agent gets a 504; 0: no limit.",
        )
        loader.add_option(
            "llm_traj_rock_file", str, _DEFAULTS["llm_traj_rock_file"],
            "Anti-call: also exchange calls through a ROCK-style log file (LLM_REQUEST_START...); {session} in "
            "the path is replaced by the session id, else the file serves the default session only.",
        )

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("llm_traj_") for name in updated):
            return
        settings = self._options.settings
        new = _read_settings(settings) if settings is not None else None
        if new == self._settings:
            return
        self._stop()
        if new is None:
            return
        broker = Broker(new.hold_timeout)
        control = ControlServer(broker, self._token)
        try:
            control.bind(new.control_port, new.control_host)
        except OSError as exc:  # (on a rollback the old settings start afresh)
            control.close()
            raise exceptions.OptionsError(f"anti-call control API: cannot listen on {new.control_host}:{new.control_port}: "
                                          f"{exc}") from None  # fmt: skip
        broker.listeners.extend(self.listeners)
        self._settings, self.broker, self._control = new, broker, control
        asyncio.ensure_future(control.start())
        if new.rock_file:
            self._rock = RockFileChannel(broker, new.rock_file, settings.default_session)
            self._rock.start()

    @property
    def control_url(self) -> str | None:
        """Where the control API listens (None outside anti-call mode)."""
        return self._control.url if self._control is not None else None

    def serves_flows(self) -> bool:
        return self.broker is not None

    def running(self) -> None:
        if self._settings is not None:
            rock = f", ROCK log {self._settings.rock_file}" if self._settings.rock_file else ""
            logger.info(f"llm-traj: anti-call control API on {self._control.url}, control file "
                        f"{self._settings.control_file}{rock}")  # fmt: skip

    def request(self, flow: http.HTTPFlow) -> None:
        broker = self.broker
        call = llm_call(flow)
        if broker is None or call is None or flow.response is not None:
            return
        api = call.api
        try:
            request = json.loads(flow.request.get_content(strict=False) or b"")
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            failure = Failure(400, f"llm-traj: the request body is not a JSON object ({exc})", "invalid_request_error")
            self._serve(flow, error_answer(api, failure))
            return
        try:
            held = broker.open_call(call.session, api, redact_fields(request), api.wants_stream(request))
        except BrokerError as exc:  # its session ended, or the proxy is stopping
            kind = "server_error" if exc.status >= 500 else "invalid_request_error"
            self._serve(flow, error_answer(api, Failure(exc.status, str(exc), kind, exc.code)))
            return
        info: CallMetadata = flow.metadata[CALL_KEY]
        info[CALL_ID_KEY] = held.id
        info["extra"] = held.extra  # filled by the drivers, written by the recorder at the end

        async def produce() -> ProducedResponse:
            rearm = disarm_idle_timeout(flow)
            try:
                result = await answer(broker, held)
            except BaseException:
                rearm()
                raise

            def on_done(completed: bool) -> None:
                rearm()
                if not completed:
                    broker.release(held.id)

            return ProducedResponse(result.status, result.headers, result.body, on_done)

        self._loopback.serve(flow, produce)

    def error(self, flow: http.HTTPFlow) -> None:
        call_id = (flow.metadata.get(CALL_KEY) or {}).get(CALL_ID_KEY)
        if call_id is not None and self.broker is not None:
            self.broker.release(call_id)  # the agent hung up: tell the drivers

    def done(self) -> None:
        self._stop()

    @command.command("llm_traj.session.end")
    def end_session(self, session: str) -> None:
        """End an anti-call session (the agent is gone): its held calls get a
        410, drivers get session_end, its later calls are refused."""
        try:
            info = self._live_broker("llm_traj.session.end").end_session(validate_session(session), "ended by a command")
        except InvalidSession as exc:
            raise exceptions.CommandError(f"llm_traj.session.end: {exc}") from None
        logger.info(f"llm-traj: session {info.id} ended ({info.calls} calls)")

    @command.command("llm_traj.calls.held")
    def held_calls(self) -> Sequence[str]:
        """The anti-call calls waiting for a driver's answer, one line each."""
        now = time.time()
        return [
            f"{c.id} {c.api}{' stream' if c.stream else ''} {c.state}, held {now - c.created_at:.1f} s"
            for c in self._live_broker("llm_traj.calls.held").held()
        ]

    def _live_broker(self, command_name: str) -> Broker:
        if self.broker is None:
            raise exceptions.CommandError(f"{command_name}: the proxy is not in anti-call mode (llm_traj_mode=anticall)")
        return self.broker

    # --- internals -----------------------------------------------------------

    def _serve(self, flow: http.HTTPFlow, result: Answer) -> None:
        async def produce() -> ProducedResponse:
            return ProducedResponse(result.status, result.headers, result.body)

        self._loopback.serve(flow, produce)

    def _stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.shutdown()

    def _stop(self) -> None:
        if self.broker is not None:
            self.broker.shutdown()
        if self._rock is not None:
            self._rock.close()
        if self._control is not None:
            self._control.close()
        self._settings = self.broker = self._control = self._rock = None


def _read_settings(settings: Settings) -> AntiCallSettings | None:
    opts = ctx.options
    if settings.mode != "anticall":
        for name, default in _DEFAULTS.items():
            if getattr(opts, name) != default:
                raise exceptions.OptionsError(f"{name} is only used with llm_traj_mode=anticall")
        return None
    port = opts.llm_traj_control_port
    if not 0 <= port <= 65535:
        raise exceptions.OptionsError(f"llm_traj_control_port={port} is not a port (0-65535; 0: any free port)")
    hold = seconds_option("llm_traj_hold_timeout")
    rock = opts.llm_traj_rock_file.strip()
    if rock and Path(rock.replace("{session}", "default")).expanduser().is_dir():
        raise exceptions.OptionsError(f"llm_traj_rock_file={rock!r} is a directory; give a file path (with {{session}} for one per session)")
    host = opts.llm_traj_control_host.strip()
    if not host:
        raise exceptions.OptionsError("llm_traj_control_host is empty; give an address of this machine (default 127.0.0.1)")
    return AntiCallSettings(port, host, hold, rock, control_file_for(settings.path))
