"""Shared end-to-end harness: a stand-in upstream and a real mitmdump with the
addon, both on 127.0.0.1 with ephemeral ports, stopped when the tests end."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import settings
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.record import CallRecord
from llmtraj.core.store import read_records
from llmtraj.testing.standin import StandinUpstream

# Property tests (hypothesis): a quick profile in the default run, `ci` (1,000
# examples a property) in .ci/run, the long one (10,000) from scripts/properties.
settings.register_profile("quick", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=1_000, deadline=None)
settings.register_profile("long", max_examples=10_000, deadline=None)
settings.load_profile(os.environ.get("LLM_TRAJ_PROPERTIES", "quick"))


@pytest.fixture(scope="session")
def upstream():
    with StandinUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def traj_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("traj")


@pytest.fixture(scope="module")
def proxy(upstream, traj_dir):
    """One recording proxy per test module; tests keep apart by session id."""
    with ProxyProcess(
        upstream=upstream.url,
        options={"llm_traj_mode": "record", "llm_traj_path": traj_dir},
    ) as p:
        yield p


@pytest.fixture
def session(request) -> str:
    """A session id unique to the test."""
    name = request.node.name.replace("[", "-").replace("]", "")
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:100]


def wait_records(path: Path, count: int, timeout: float = 10.0) -> list[CallRecord]:
    """The records of a trajectory file once it holds `count` of them (the
    record is written just after the client has its last byte)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_records(path)) if path.exists() else []
        if len(records) >= count or time.monotonic() > deadline:
            assert len(records) == count, f"{path}: expected {count} records, found {len(records)}"
            return records
        time.sleep(0.02)
