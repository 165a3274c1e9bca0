"""Runs a real agent CLI under `llm-traj run`: recorded in anti-call mode with
the scripted policy (tests/agents/policy.py) answering, or replayed with no
upstream. Each run has its own $HOME and working directory (or reuses
another's) and may have its clock moved (libfaketime)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICY = HERE / "policy.py"
SESSION = "task-1"
TASK = "Create the file agent-out.txt with one line of text in it, then say done."
OUT_FILE = "agent-out.txt"
FILE_TEXT = "written by the scripted policy\n"


@dataclass(frozen=True)
class Agent:
    name: str
    command: tuple[str, ...]  # the agent, after `llm-traj run ... --`
    env: dict[str, str]  # besides HOME
    https_proxy_env: dict[str, str] = field(default_factory=dict)  # only through HTTPS_PROXY
    home_files: dict[str, str] = field(default_factory=dict)  # written under $HOME before each run

    def argv(self, faketime: str | None) -> list[str]:
        if faketime is None:
            return list(self.command)
        if self.name == "codex":  # a static binary: the wrapper moves its clock (under qemu-user)
            return [self.command[0], "--faketime", faketime, *self.command[1:]]
        return ["faketime", "-f", faketime, *self.command]


CLAUDE = Agent(
    "claude-code",
    ("claude", "-p", TASK, "--dangerously-skip-permissions"),
    {"IS_SANDBOX": "1", "DISABLE_AUTOUPDATER": "1"},  # IS_SANDBOX: it refuses to skip permissions as root otherwise
    # Through HTTPS_PROXY it would also fetch its MCP registry and send telemetry
    # to api.anthropic.com (other traffic, which replay leaves alone).
    https_proxy_env={"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"},
)
CODEX = Agent("codex", (str(HERE / "run-codex"), TASK), {})
QWEN = Agent(
    "qwen-code",
    ("qwen", "-p", TASK, "--yolo", "--auth-type", "openai"),
    {"OPENAI_MODEL": "qwen3-coder-plus"},
    https_proxy_env={"OPENAI_BASE_URL": "https://api.openai.com/v1"},
    # usage statistics would go to another host (other traffic, which replay leaves alone)
    home_files={".qwen/settings.json": '{"privacy": {"usageStatisticsEnabled": false}, "telemetry": {"enabled": false}}'},
)
OPENCODE = Agent(
    "opencode",
    ("opencode", "run", TASK),
    {"OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1"},
    # it fetches its plugin packages' metadata from npm itself: not through the proxy
    https_proxy_env={"OPENAI_BASE_URL": "https://api.openai.com/v1", "NO_PROXY": "registry.npmjs.org"},
    # an OpenAI-compatible provider at the base URL llm-traj run gives it
    home_files={".config/opencode/opencode.json": json.dumps({
        "autoupdate": False, "share": "disabled", "model": "replayable/gpt-4.1",
        "provider": {"replayable": {"npm": "@ai-sdk/openai-compatible", "name": "replayable",
                                    "options": {"baseURL": "{env:OPENAI_BASE_URL}", "apiKey": "{env:OPENAI_API_KEY}"},
                                    "models": {"gpt-4.1": {"name": "gpt-4.1"}}}},
    })},
)  # fmt: skip


@dataclass
class Place:
    """Where an agent runs: its $HOME and working directory."""

    home: Path
    work: Path

    @classmethod
    def make(cls, root: Path) -> Place:
        place = cls(root / "home", root / "work")
        place.home.mkdir(parents=True)
        place.work.mkdir(parents=True)
        return place


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    proxy_log: str
    out_file: Path

    def upstream_connections(self) -> list[str]:
        """Connections the proxy opened (or tried) to anything: its log's own lines."""
        return [line for line in self.proxy_log.splitlines()
                if "server connect" in line or "error establishing server connection" in line]  # fmt: skip

    def describe(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout[-2000:]}\n--- stderr\n{self.stderr[-4000:]}"


class Tripwire:
    """A TCP port that counts the connections made to it (the reverse target of
    a replay: it must see none)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._server.close()


def llm_traj() -> str:
    return str(Path(sys.executable).with_name("llm-traj"))


def run_agent(
    agent: Agent,
    place: Place,
    traj: Path,
    *,
    mode: str,
    via: str = "base-url",
    faketime: str | None = None,
    upstream: str | None = None,
    sets: tuple[str, ...] = (),
    config: Path | None = None,
    scratch: Path,
    timeout: float = 240,
) -> Run:
    """One run of the agent under `llm-traj run` (`sets`: its proxy's options,
    NAME=VALUE); in anti-call mode the scripted policy answers (started first,
    stopped by the session's end)."""
    scratch.mkdir(parents=True, exist_ok=True)
    (place.work / OUT_FILE).unlink(missing_ok=True)
    for name, text in agent.home_files.items():
        (place.home / name).parent.mkdir(parents=True, exist_ok=True)
        (place.home / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPENAI_", "CODEX_"))}
    # TMPDIR: llm-traj run's scratch; PWD: opencode takes its working directory from it
    env.update(agent.env, HOME=str(place.home), TMPDIR=str(scratch), PWD=str(place.work))
    if agent.name == "codex":
        env["CODEX_HOME"] = str(place.home / ".codex")
    if via == "https-proxy":
        env.update(agent.https_proxy_env)
    policy = None
    if mode == "anticall":
        policy = subprocess.Popen(
            [sys.executable, str(POLICY), str(traj / "control.json"), SESSION, str(scratch / "policy.jsonl")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    proxy_log = Path(tempfile.mkstemp(prefix="proxy-", suffix=".log", dir=scratch)[1])
    argv = [llm_traj(), "run", "--mode", mode, "--traj", str(traj), "--session", SESSION, "--via", via,
            "--proxy-log", str(proxy_log)]  # fmt: skip
    if upstream is not None:
        argv += ["--upstream", upstream]
    for option in sets:
        argv += ["--set", option]
    if config is not None:
        argv += ["--config", str(config)]
    try:
        out = subprocess.run([*argv, "--", *agent.argv(faketime)], cwd=place.work, env=env,
                             capture_output=True, text=True, timeout=timeout)  # fmt: skip
    finally:
        if policy is not None:
            try:
                policy_out = policy.communicate(timeout=30)[0]
            except subprocess.TimeoutExpired:
                policy.kill()
                policy_out = policy.communicate()[0]
            assert policy.returncode == 0, f"the scripted policy failed: {policy_out}"
    log = proxy_log.read_text()
    assert "listening at" in log, f"no proxy log: {out.stderr}"  # the checks made on it must not pass vacuously
    return Run(out.returncode, out.stdout, out.stderr, log, place.work / OUT_FILE)
