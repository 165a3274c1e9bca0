"""`llm-traj run`: wrap an agent process with a proxy for its whole lifetime.

Starts mitmdump with the addon on a free loopback port, runs the agent with an
environment that sends its model calls through the proxy, forwards signals to
it, and when it exits ends its session, stops the proxy and returns the
agent's exit code.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..core.session import InvalidSession, validate_session
from ..upstreams.config import NO_UPSTREAM, ConfigError, key_variables, read_config
from .proxy_process import ProxyProcess

VIA = ("base-url", "https-proxy")
DUMMY_KEY = "llm-traj-no-key"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class RunError(Exception):
    """A problem the user can fix; the message is one line."""


@dataclass
class RunPlan:
    mode: str
    traj: Path
    session: str
    via: str
    upstream: str | None
    command: Sequence[str]
    sets: dict[str, str] = field(default_factory=dict)
    confdir: Path | None = None
    proxy_log: Path | None = None  # where the proxy's log is kept (None: removed with the run)


def check_upstream(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RunError(f"--upstream {url!r} is not an http(s) URL, e.g. https://api.openai.com")
    return url.rstrip("/")


# What the command's proxies start with (a --set overrides it). `lazy` in every
# mode: with mitmproxy's default `eager` a dead upstream drops the agent's
# connection unrecorded, where `lazy` answers it with a 502 and records it.
COMMAND_DEFAULTS = {"connection_strategy": "lazy"}


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    sets = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise RunError(f"--set {item!r}: use --set option=value")
        sets[name] = value
    return sets


def plan_run(
    *,
    mode: str,
    traj: Path,
    session: str,
    via: str,
    upstream: str | None,
    command: Sequence[str],
    sets: Sequence[str] = (),
    proxy_log: Path | None = None,
) -> RunPlan:
    if not command:
        raise RunError("no agent command: put it after --, e.g. llm-traj run -- python agent.py")
    if shutil.which(command[0]) is None:
        raise RunError(f"agent command not found: {command[0]}")
    if via not in VIA:
        raise RunError(f"--via {via!r}: use {' or '.join(VIA)}")
    try:
        validate_session(session)
    except InvalidSession as exc:
        raise RunError(f"--session: {exc}") from None
    parsed = parse_sets(sets)
    if upstream is not None:
        upstream = check_upstream(upstream)
    elif via == "base-url" and mode == "record" and "llm_traj_config" not in parsed:
        raise RunError("--upstream (or --config) is required to record in base-url mode, "
                       "e.g. --upstream https://api.openai.com")
    return RunPlan(mode, traj, session, via, upstream, list(command), parsed,
                   proxy_log=proxy_log.expanduser().resolve() if proxy_log is not None else None)  # fmt: skip


def proxy_for(plan: RunPlan, run_dir: Path) -> ProxyProcess:
    options: dict[str, object] = {
        **COMMAND_DEFAULTS,
        "llm_traj_mode": plan.mode,
        "llm_traj_path": plan.traj,
        "llm_traj_session": plan.session,
    }
    upstream = plan.upstream
    if plan.via == "https-proxy":
        plan.confdir = run_dir / "mitmproxy"
        options["confdir"] = plan.confdir
        upstream = None  # regular mode: the agent names its own hosts
    elif upstream is None:
        # replay / anti-call answer every LLM call themselves; with a config, it routes them
        upstream = NO_UPSTREAM
    options.update(plan.sets)
    return ProxyProcess(upstream=upstream, options=options, log=plan.proxy_log or run_dir / "proxy.log")


def ca_bundle(confdir: Path, out: Path) -> Path:
    """The system's trusted CAs plus mitmproxy's, for agents in https-proxy mode."""
    parts = []
    paths = ssl.get_default_verify_paths()
    candidates = [paths.cafile, paths.openssl_cafile]
    try:
        import certifi

        candidates.append(certifi.where())
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            parts.append(Path(candidate).read_text())
            break
    parts.append((confdir / "mitmproxy-ca-cert.pem").read_text())
    out.write_text("\n".join(parts))
    return out


def agent_env(plan: RunPlan, proxy_url: str, run_dir: Path, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    config = plan.sets.get("llm_traj_config")
    if config:  # the keys the proxy injects stay out of the agent's reach
        try:
            for name in key_variables(read_config(config)):
                env.pop(name, None)
        except ConfigError as exc:
            raise RunError(f"--config: {exc}") from None
    env["LLM_TRAJ_SESSION"] = plan.session
    if plan.via == "base-url":
        env.update(base_url_env(proxy_url, plan.session))
    else:
        bundle = str(ca_bundle(plan.confdir, run_dir / "ca-bundle.pem"))
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
            env[name] = proxy_url
        env.update(
            SSL_CERT_FILE=bundle,
            REQUESTS_CA_BUNDLE=bundle,
            CURL_CA_BUNDLE=bundle,
            NODE_EXTRA_CA_CERTS=bundle,
        )
    add_placeholder_keys(env)
    return env


def base_url_env(proxy_url: str, session: str) -> dict[str, str]:
    """The variables that send an agent's calls to the proxy by base URL, in `session`."""
    root = f"{proxy_url}/s/{session}"
    return {
        "LLM_TRAJ_SESSION": session,
        "OPENAI_BASE_URL": f"{root}/v1",
        "OPENAI_API_BASE": f"{root}/v1",  # LiteLLM and older SDKs
        "ANTHROPIC_BASE_URL": root,  # the Anthropic SDK appends /v1/messages
        "ANTHROPIC_API_BASE": root,  # LiteLLM
    }


def add_placeholder_keys(env: dict[str, str]) -> None:
    """An agent needs some key to start; the proxy injects the real one (upstream
    config), or answers itself (replay, anti-call). A key of the agent's own is kept."""
    if not env.get("OPENAI_API_KEY"):
        env["OPENAI_API_KEY"] = DUMMY_KEY
    if not env.get("ANTHROPIC_API_KEY") and not env.get("ANTHROPIC_AUTH_TOKEN"):
        env["ANTHROPIC_AUTH_TOKEN"] = DUMMY_KEY  # Claude Code's variable; the SDK reads it too


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _from_terminal(signum: int) -> bool:
    """Whether a SIGINT/SIGQUIT most likely came from the terminal, which then
    delivered it to the agent (same foreground process group) already."""
    if signum not in (signal.SIGINT, signal.SIGQUIT):
        return False
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def run_agent(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Run the agent in the foreground, forwarding signals; its exit code."""
    try:
        agent = subprocess.Popen(list(command), env=dict(env))
    except OSError as exc:
        raise RunError(f"cannot start agent {command[0]}: {exc.strerror}") from None

    def forward(signum, _frame):
        if not _from_terminal(signum) and agent.poll() is None:
            agent.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        while True:
            try:
                return exit_code(agent.wait())
            except InterruptedError:
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(plan: RunPlan, run_dir: Path, on_agent_exit: Callable[[ProxyProcess], None] | None = None) -> tuple[int, float]:
    """Run the plan; (the agent's exit code, the run's start time)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    proxy = proxy_for(plan, run_dir)
    proxy.start()
    try:
        env = agent_env(plan, proxy.url, run_dir, os.environ)
        code = run_agent(plan.command, env)
        if on_agent_exit is not None:
            on_agent_exit(proxy)
    finally:
        proxy.stop()
    return code, started


def replay_report(plan: RunPlan, proxy: ProxyProcess) -> dict | None:
    """The proxy's replay report (None if it cannot be had): asked of the
    proxy itself, as a proxy when the agent reached it through HTTPS_PROXY."""
    import json
    import urllib.request

    from ..replay.report import REPORT_PATH

    if plan.via == "https-proxy":  # any host: the proxy answers the path itself, connecting nowhere
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
        url = f"http://llm-traj.invalid{REPORT_PATH}"
    else:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"{proxy.url}{REPORT_PATH}"
    try:
        with opener.open(url, timeout=10) as answer:
            return json.loads(answer.read())
    except (OSError, ValueError):
        return None
