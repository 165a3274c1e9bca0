"""The real inference engine for the tests in this folder: vLLM's CPU build
(from `scripts/engine-setup`) serving the tiny model `tinymodel.py` builds.

These tests need that 3.4 GB environment and a minute or two to start the
engine, so the default run skips them; `scripts/test-engine` runs them
(it sets LLM_TRAJ_ENGINE_TESTS=1)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llmtraj.cli.proxy_process import ServerProcess

from .tinymodel import CONTEXT, fingerprint  # stdlib only at import time

ROOT = Path(__file__).resolve().parents[2]
ENGINE_PYTHON = ROOT / ".venv-engine" / "bin" / "python"
MODELS = ROOT / ".engine-models"
ENABLED = os.environ.get("LLM_TRAJ_ENGINE_TESTS") == "1"
HERE = Path(__file__).resolve().parent
MODEL_NAME = "tiny-qwen2"
START_TIMEOUT = 420.0


def pytest_collection_modifyitems(config, items):
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="needs the real engine: run scripts/test-engine")
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(skip)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model() -> Path:
    """The tiny model's directory, built by the engine's Python once per builder version."""
    directory = MODELS / f"tiny-qwen2-{fingerprint()}"
    subprocess.run([str(ENGINE_PYTHON), str(HERE / "tinymodel.py"), str(directory)], check=True,
                   stdout=subprocess.DEVNULL, timeout=600)  # fmt: skip
    return directory


class Engine:
    def __init__(self, process: ServerProcess, model_dir: Path) -> None:
        self.process = process
        self.model_dir = model_dir
        self.url = process.url
        self.model = MODEL_NAME

    def tokenize(self, **body) -> list[int]:
        """The engine's own `/tokenize` of a chat (messages, tools) or a prompt."""
        response = httpx.post(f"{self.url}/tokenize", json={"model": self.model, **body}, timeout=30)
        response.raise_for_status()
        return response.json()["tokens"]


@pytest.fixture(scope="session")
def engine():
    if not ENGINE_PYTHON.exists():
        pytest.fail("no .venv-engine: run scripts/engine-setup (scripts/test-engine does)")
    model_dir = build_model()
    port = _free_port()
    # The engine runs on core 0 only (its worker's OpenMP threads too), so the proxy, the agent and the test
    # always have the other. Spread over both cores, vLLM's CPU build at times took both for 2 s at once (its
    # scheduler polls; on this VM's kernel every other runnable thread, a 20 ms sampler included, then waited),
    # and a stream's text reached the agent that long after the engine's events reached the proxy.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"
    process = ServerProcess(
        [
            "taskset", "-c", "0", str(ENGINE_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", MODEL_NAME, "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--max-model-len", str(CONTEXT),
            # A prompt served from the prefix cache takes other float paths; the tiny random model's
            # logits are nearly level, so that can flip a greedy choice between two runs of one request.
            "--no-enable-prefix-caching",
        ],
        re.compile(r"Starting vLLM server on http://([\d.]+):(\d+)"),
    )  # fmt: skip
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    started = time.monotonic()
    try:  # stopped however the setup ends too (a test timeout while the engine starts left it running)
        process.start(timeout=START_TIMEOUT)
        _wait_healthy(process, started)
        yield Engine(process, model_dir)
    finally:
        process.stop(timeout=30)


def _wait_healthy(process: ServerProcess, started: float) -> None:
    while True:
        try:
            if httpx.get(f"{process.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > START_TIMEOUT:
            raise RuntimeError(f"vLLM did not become healthy: {process.failure_reason()}")
        time.sleep(0.5)
