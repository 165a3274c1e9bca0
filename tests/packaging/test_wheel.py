"""The built wheel, installed with pip into a fresh venv (the interpreter that
runs the tests, no site packages, nothing from this checkout): `pip check` is
clean, `llm-traj demo` records and replays its agent, and the installed
stand-in and proxy answer every stand-in scenario (installed_check.py). The
wheel ships the stand-in's fixtures and not the benchmark or the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).with_name("installed_check.py")

pytestmark = pytest.mark.wheel


def run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    # Outside the checkout, without the test venv's variables: only the install is found.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, ROOT, cwd=dist)
    (built,) = dist.glob("llm_traj-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", venv, cwd=venv)
    run(venv / "bin/python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, cwd=venv)
    return venv


def test_wheel_ships_the_fixtures_not_the_benchmark_or_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "llm_traj.py" in names and "llmtraj/testing/standin.py" in names
    fixtures = [n for n in names if n.startswith("llmtraj/testing/fixtures/streams/")]
    assert {n.split("/")[4] for n in fixtures if n.count("/") == 5} == {"anthropic", "completions", "responses"}
    assert not [n for n in names if "bench" in n or n.startswith("tests/")]


def test_installed_wheel_runs_the_demo_and_every_standin_scenario(venv, tmp_path):
    check = run(venv / "bin/python", "-m", "pip", "check", cwd=tmp_path)
    assert "No broken requirements found." in check.stdout
    where = run(venv / "bin/python", "-c", "import llmtraj; print(llmtraj.__file__)", cwd=tmp_path).stdout
    assert where.startswith(str(venv))  # the installed package, not this checkout

    demo = run(venv / "bin/llm-traj", "demo", "--out", tmp_path / "demo", cwd=tmp_path).stdout
    assert "recorded 2 calls" in demo and "the agent got the same answer" in demo

    scenarios = run(venv / "bin/python", CHECK, tmp_path / "traj", cwd=tmp_path).stdout
    assert "every scenario answered and recorded alike" in scenarios
    for api in ("chat.completions", "anthropic.messages", "responses", "completions"):
        assert f"{api} " in scenarios
