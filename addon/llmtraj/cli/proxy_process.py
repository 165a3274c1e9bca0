"""Runs mitmdump or mitmweb (with or without the llm-traj addon), or the
stand-in upstream, as a child process and waits until it listens. Used by the `llm-traj` command, the tests
and the benchmark, so all of them start the proxy exactly the same way.

The proxy runs in its own session (process group): a Ctrl-C in the terminal
reaches the agent, not the proxy, which must outlive the agent's last call; the
owner stops it explicitly. Its output goes to a log file, where readiness is
read from, so a detached proxy (`llm-traj start`) works the same way."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

ADDON_SCRIPT = Path(__file__).resolve().parents[2] / "llm_traj.py"
_READY = re.compile(r"llm-traj: ready, .* listening on ([^,\s]+):(\d+)")
_BARE_READY = re.compile(r"listening at \[?([^\]\s]*?)\]?:(\d+)\.")
_WEB_READY = re.compile(r"Web server listening at (\S+)")


_STARTUP_NOTICE = "Error logged during startup"  # mitmproxy's line once an error was logged, before it exits


class ProxyStartError(RuntimeError):
    pass


def mitm_program(name: str = "mitmdump") -> str:
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ProxyStartError(f"{name} not found: install llm-traj (pip install -e .) in this Python environment")
    return found


class ServerProcess:
    """A child server process that prints a line matching `ready` (with the
    port as its second group) once it listens. Output goes to `log`."""

    def __init__(
        self, args: list[str], ready: re.Pattern[str], *, host: str = "127.0.0.1", log: Path | None = None,
        die_with_parent: bool = False,  # SIGTERMed when the thread that starts it ends (Linux)
    ) -> None:
        self.args = args
        self._die_with_parent = die_with_parent
        self._ready = ready
        self._own_log = log is None
        self.log = Path(log) if log else Path(tempfile.mkstemp(prefix="llm-traj-proc-", suffix=".log")[1])
        self.host = host
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._offset = 0  # where this run's output starts in the log
        self._final_output: str | None = None  # kept when our temporary log is removed

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        # 0600: the proxy's log may quote calls
        with open(self.log, "ab", opener=lambda path, flags: os.open(path, flags, 0o600)) as sink:
            self._proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=_terminate_with_parent if self._die_with_parent else None,
            )
        self.port = int(self.await_line(self._ready, timeout).group(2))
        return self

    def await_line(self, pattern: re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """The first match of `pattern` in this run's output, once it is there.
        Stops the process and raises ProxyStartError if it exits or times out first."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if m := pattern.search(self._read_log(self._offset)):
                return m
            if self._proc.poll() is not None or time.monotonic() > deadline:
                reason = self.failure_reason(self._offset)  # before stop() removes our temporary log
                self.stop()
                raise ProxyStartError(reason)
            time.sleep(0.02)

    def _read_log(self, offset: int = 0) -> str:
        with open(self.log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")

    def failure_reason(self, offset: int = 0) -> str:
        """The process's own error lines (llm-traj's one-liners first), else its last lines."""
        lines = [line for line in self._read_log(offset).splitlines() if line.strip()]
        ours = [line.split("llm-traj: ", 1)[1] for line in lines if "llm-traj: " in line]
        # mitmproxy's own error (a port it could not bind, logged before or after llm-traj's "recording to
        # ..." as the version goes), not its notice that one was logged (which follows llm-traj's own errors)
        if ours:
            theirs = [line for line in lines if "rror" in line and "llm-traj: " not in line and _STARTUP_NOTICE not in line]
            return theirs[0].strip() if theirs else ours[-1]
        errors = [line for line in lines if "rror" in line]
        return (errors or lines or [f"{Path(self.args[0]).name} exited without output"])[-1].strip()

    def wait(self) -> int:
        """Block until the process exits by itself; its exit code."""
        assert self._proc is not None
        return self._proc.wait()

    def output(self) -> str:
        return self._final_output if self._final_output is not None else self._read_log()

    def stop(self, timeout: float = 10.0) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_log and self.log.exists():
            self._final_output = self._read_log()
            self.log.unlink()
        return proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ProxyProcess(ServerProcess):
    """`with ProxyProcess(upstream=..., options={...}) as proxy: proxy.url`."""

    def __init__(
        self,
        *,
        upstream: str | None = None,
        options: Mapping[str, object] | None = None,
        addon: bool = True,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        extra_args: Iterable[str] = (),
        log: Path | None = None,
        program: str = "mitmdump",
        die_with_parent: bool = False,
    ) -> None:
        args = [mitm_program(program), "--listen-host", listen_host, "-p", str(port)]
        if program == "mitmweb":
            args += ["--no-web-open-browser"]
        if upstream:
            args += ["--mode", f"reverse:{upstream}"]
        if addon:
            args += ["-s", str(ADDON_SCRIPT)]
        for name, value in (options or {}).items():
            args += ["--set", f"{name}={value}"]
        args += list(extra_args)
        super().__init__(args, _READY if addon else _BARE_READY, host=listen_host, log=log, die_with_parent=die_with_parent)
        self.addon = addon

    def written_records(self, session: str, directory: Path, timeout: float = 30.0) -> list:
        """The session's records (`CallRecord`s) in the trajectory directory,
        once the proxy has written every call of it that got an answer (its
        written barrier, `GET /llm-traj/written`); TimeoutError if it did not in time."""
        import json
        import urllib.error
        import urllib.parse
        import urllib.request

        from ..core.store import TrajectoryReader

        query = urllib.parse.urlencode({"session": session, "timeout": timeout})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            opener.open(f"{self.url}/llm-traj/written?{query}", timeout=timeout + 10).close()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}"
            raise TimeoutError(message) from None
        file = Path(directory) / f"{session}.jsonl"
        return TrajectoryReader(file).sessions.get(session, []) if file.exists() else []

    def web_url(self) -> str:
        """mitmweb's address for a browser as mitmweb logs it: with the access
        token mitmweb 12 makes at each start (11 has none)."""
        return self.await_line(_WEB_READY).group(1)


def _terminate_with_parent() -> None:
    """In the child before it runs: SIGTERM it when the thread that started it
    ends (Linux's parent-death signal), so a proxy never outlives its owner,
    even one killed with SIGKILL (a Ray actor). Elsewhere: a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


_PR_SET_PDEATHSIG = 1


def standin_process(*extra_args: str) -> ServerProcess:
    """The stand-in upstream as a child process (`python -m llmtraj.testing.standin`)."""
    return ServerProcess(
        [sys.executable, "-m", "llmtraj.testing.standin", "--port", "0", *extra_args],
        re.compile(r"listening on http(s?)://127\.0\.0\.1:(\d+)"),
    )
