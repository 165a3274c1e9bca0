"""`llm-traj prompts` driven as a subprocess: the registry survives between
commands (each a new process), bad input is one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from llmtraj.prompts.registry import PromptRegistry


def llm_traj(registry, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "llmtraj.cli.app", "prompts", *args, "--prompts", str(registry)],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip


@pytest.fixture
def files(tmp_path):
    (tmp_path / "v1.txt").write_text("You help {{user}} with {{topic}}.")
    (tmp_path / "v2.txt").write_text("You help {{user}} with {{topic}}. Be brief.")
    (tmp_path / "chat.json").write_text(json.dumps([{"role": "system", "content": "You are a chat prompt."},
                                                    {"role": "user", "content": "{{question}}"}]))  # fmt: skip
    return tmp_path


def test_add_list_show_label_diff(tmp_path, files):
    registry = tmp_path / "reg" / "prompts.sqlite"
    out = llm_traj(registry, "add", "helper", str(files / "v1.txt"), "-m", "first", "--label", "production")
    assert out.returncode == 0 and out.stdout.strip() == "helper/1 added; labels: latest, production"
    assert "helper/2 added" in llm_traj(registry, "add", "helper", str(files / "v2.txt"), "-m", "brief").stdout
    assert "unchanged" in llm_traj(registry, "add", "helper", str(files / "v2.txt")).stdout
    assert llm_traj(registry, "add", "chatty", str(files / "chat.json")).returncode == 0
    listing = llm_traj(registry, "list").stdout
    assert "helper" in listing and "latest→2, production→1" in listing and "user, topic" in listing
    shown = llm_traj(registry, "show", "helper@production").stdout
    assert "helper/1" in shown and shown.rstrip().endswith("You help {{user}} with {{topic}}.")
    assert '"You are a chat prompt."' in llm_traj(registry, "show", "chatty").stdout
    assert llm_traj(registry, "label", "helper", "2", "production").stdout.strip() == "helper@production → helper/2"
    assert "helper/2" in llm_traj(registry, "show", "helper@production").stdout
    history = llm_traj(registry, "show", "helper", "--history").stdout
    assert "first" in history and "brief" in history
    diff = llm_traj(registry, "diff", "helper", "1", "latest").stdout
    assert "-You help {{user}} with {{topic}}." in diff and "+You help {{user}} with {{topic}}. Be brief." in diff


@pytest.mark.parametrize("args, message", [
    (("show", "nope"), "no prompt named 'nope'"),
    (("show", "helper@canary"), "has no label 'canary'"),
    (("show", "helper/5"), "has no version 5; it has 1-1"),
    (("label", "helper", "3", "production"), "has no version 3"),
    (("add", "broken", "BAD"), "placeholder"),
    (("add", "helper", "MISSING"), "cannot read"),
    (("show", "a@b/c"), "not a prompt reference"),
    (("import", "MISSING"), "is not a folder of prompts"),
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(tmp_path, files, args, message):
    registry = tmp_path / "prompts.sqlite"
    assert llm_traj(registry, "add", "helper", str(files / "v1.txt")).returncode == 0
    (files / "BAD").write_text("Hello {{not a name}}")
    args = tuple(str(files / a) if a in ("BAD", "MISSING") else a for a in args)
    out = llm_traj(registry, *args)
    assert out.returncode == 2, out
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_no_registry_yet(tmp_path):
    out = llm_traj(tmp_path / "none.sqlite", "show", "x")
    assert out.returncode == 2 and "no prompt registry" in out.stderr and not (tmp_path / "none.sqlite").exists()


def test_export_import_round_trip(tmp_path, files):
    first, second, folder = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "in-git"
    llm_traj(first, "add", "helper", str(files / "v1.txt"), "-m", "first", "--tag", "exp-1")
    llm_traj(first, "add", "helper", str(files / "v2.txt"), "-m", "brief", "--label", "staging")
    llm_traj(first, "add", "chatty", str(files / "chat.json"))
    assert llm_traj(first, "export", str(folder)).returncode == 0
    assert sorted(p.name for p in (folder / "helper").iterdir()) == ["1.meta.json", "1.txt", "2.meta.json", "2.txt"]
    assert llm_traj(second, "import", str(folder)).stdout.startswith("imported 3 new versions")
    assert llm_traj(second, "import", str(folder)).stdout.startswith("imported 0 new versions")
    for ref in ("helper/1", "helper@staging", "chatty"):
        assert llm_traj(first, "show", ref).stdout == llm_traj(second, "show", ref).stdout.replace(str(second), str(first))
    # every version keeps when it was made, not when it was imported
    with PromptRegistry(first) as a, PromptRegistry(second) as b:
        assert [(v.name, v.version, v.created_at) for v in a.all_versions()] == [(v.name, v.version, v.created_at) for v in b.all_versions()]
    meta = folder / "helper" / "1.meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "created_at": "yesterday"}))
    bad = llm_traj(tmp_path / "c.sqlite", "import", str(folder))
    assert bad.returncode == 2 and "created_at 'yesterday'" in bad.stderr and "Unix time" in bad.stderr


def test_run_passes_a_registry_file_resolved_and_an_mlflow_uri_as_is(tmp_path, monkeypatch):
    from llmtraj.cli.app import _prompt_sets

    monkeypatch.chdir(tmp_path)
    assert _prompt_sets("greet@staging", "reg.sqlite") == ["llm_traj_prompt_override=greet@staging",
                                                          f"llm_traj_prompts={tmp_path / 'reg.sqlite'}"]  # fmt: skip
    assert _prompt_sets(None, "mlflow:sqlite:///m.db") == ["llm_traj_prompts=mlflow:sqlite:///m.db"]
