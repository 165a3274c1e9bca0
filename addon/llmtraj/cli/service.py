"""`llm-traj start / stop / status`: the proxy as a background service, for
setups where the agent is launched elsewhere. A state file records the pid,
address and log of each named service."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..anticall.driver import pid_alive
from .proxy_process import ProxyProcess
from .run import RunError

DEFAULT_STATE_DIR = Path(os.environ.get("LLM_TRAJ_STATE_DIR", Path.home() / ".llm-traj"))


@dataclass
class ServiceState:
    name: str
    pid: int
    url: str
    mode: str
    traj: str
    log: str
    started_at: float


def state_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def read_state(state_dir: Path, name: str) -> ServiceState | None:
    try:
        return ServiceState(**json.loads(state_file(state_dir, name).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start_service(state_dir: Path, name: str, proxy: ProxyProcess, mode: str, traj: Path) -> ServiceState:
    existing = read_state(state_dir, name)
    if existing and pid_alive(existing.pid):
        raise RunError(f"service {name!r} already runs (pid {existing.pid}, {existing.url}); stop it first")
    requested = int(proxy.args[proxy.args.index("-p") + 1])
    if requested and not port_free(proxy.host, requested):
        raise RunError(f"port {requested} on {proxy.host} is busy; choose another with --port")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    proxy.start()
    state = ServiceState(name, proxy.pid, proxy.url, mode, str(traj), str(proxy.log), time.time())
    state_file(state_dir, name).write_text(json.dumps(asdict(state)))
    return state


def stop_service(state_dir: Path, name: str, timeout: float = 10.0) -> ServiceState:
    state = read_state(state_dir, name)
    if state is None:
        raise RunError(f"no service {name!r} is running (no state in {state_dir})")
    if pid_alive(state.pid):
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(state.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(state.pid):
            os.kill(state.pid, signal.SIGKILL)
    state_file(state_dir, name).unlink(missing_ok=True)
    return state


def healthy(state: ServiceState) -> bool:
    host, port = state.url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return False
    return pid_alive(state.pid)
