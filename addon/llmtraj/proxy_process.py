"""Runs mitmdump (with or without the llm-traj addon) as a child process and
waits until it listens. Used by the `llm-traj` command, the tests and the
benchmark, so all three start the proxy exactly the same way."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

ADDON_SCRIPT = Path(__file__).resolve().parent.parent / "llm_traj.py"
_READY = re.compile(r"llm-traj: ready, .* listening on ([^,\s]+):(\d+)")
_BARE_READY = re.compile(r"listening at \[?([^\]\s]*)\]?:(\d+)\.")


class ProxyStartError(RuntimeError):
    pass


def mitmdump_path() -> str:
    beside = Path(sys.executable).with_name("mitmdump")
    if beside.exists():
        return str(beside)
    found = shutil.which("mitmdump")
    if found is None:
        raise ProxyStartError("mitmdump not found: install llm-traj (pip install -e .) in this Python environment")
    return found


class ProxyProcess:
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
    ) -> None:
        args = [mitmdump_path(), "--listen-host", listen_host, "-p", str(port)]
        if upstream:
            args += ["--mode", f"reverse:{upstream}"]
        if addon:
            args += ["-s", str(ADDON_SCRIPT)]
        for name, value in (options or {}).items():
            args += ["--set", f"{name}={value}"]
        args += list(extra_args)
        self.args = args
        self.addon = addon
        self.log = log
        self.lines: list[str] = []
        self.host = listen_host
        self.port: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 30.0) -> ProxyProcess:
        self._proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(self.lines[-15:])
                raise ProxyStartError(f"mitmdump did not start (exit {self._proc.returncode}):\n{tail}")
        return self

    def _drain(self) -> None:
        ready = _READY if self.addon else _BARE_READY
        sink = open(self.log, "a") if self.log else None
        try:
            for line in self._proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if sink:
                    sink.write(line)
                    sink.flush()
                if not self._ready.is_set() and (m := ready.search(line)):
                    self.port = int(m.group(2))
                    self._ready.set()
        finally:
            if sink:
                sink.close()

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 10.0) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
