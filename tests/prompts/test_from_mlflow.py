"""MLflow's prompt registry as a source, against a local MLflow store (SQLite, no server)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import pytest
from llmtraj.prompts.from_mlflow import MlflowRegistry, copy_from_mlflow
from llmtraj.prompts.matching import PromptIndex
from llmtraj.prompts.registry import PromptError, PromptRegistry, open_registry
from llmtraj.prompts.tagging import PromptTagger


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # MLflow may make ./mlruns for artifacts
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.genai.register_prompt(name="support", template="You help {{customer}} with {{product}}.", commit_message="v1")
    mlflow.genai.register_prompt(name="support", template="You help {{customer}} with {{product}}. Be brief.",
                                 commit_message="brief", tags={"team": "cx"})  # fmt: skip
    mlflow.genai.register_prompt(name="chat", template=[{"role": "system", "content": "You are a chat prompt."},
                                                        {"role": "user", "content": "{{question}}"}])  # fmt: skip
    mlflow.genai.set_prompt_alias("support", alias="production", version=1)
    return uri


def test_copy_versions_aliases_and_refs(store, tmp_path):
    with PromptRegistry(tmp_path / "ours.sqlite") as registry:
        copied = {c.name: c for c in copy_from_mlflow(registry, store)}
        assert (copied["support"].added, copied["support"].labels) == ([1, 2], {"production": 1})
        assert registry.get("prompts:/support@production").text == "You help {{customer}} with {{product}}."
        second = registry.get("prompts:/support/2")
        assert (second.message, second.tags, second.labels) == ("brief", ("team=cx",), ("latest",))
        made = mlflow.MlflowClient(tracking_uri=store, registry_uri=store).get_prompt_version("support", 2)
        assert second.created_at == made.creation_timestamp / 1000  # when it was made in MLflow
        assert registry.get("chat").text == "You are a chat prompt." and registry.get("chat").messages[1]["role"] == "user"
        # tagging sees MLflow's versions
        found = PromptIndex(registry.all_versions()).match("You help Ann with printers. Be brief.")
        assert (found.version.name, found.version.version, found.variables) == ("support", 2, {"customer": "Ann", "product": "printers"})
        # again: nothing new; a moved alias moves the label
        mlflow.genai.set_prompt_alias("support", alias="production", version=2)
        again = {c.name: c for c in copy_from_mlflow(registry, store, ["support"])}
        assert (again["support"].added, registry.get("support@production").version) == ([], 2)
        with pytest.raises(PromptError, match="MLflow at sqlite:.*: Prompt with name=nope not found"):
            copy_from_mlflow(registry, store, ["nope"])


def test_cli_import_mlflow_then_override_by_mlflow_uri(store, tmp_path):
    ours = tmp_path / "ours.sqlite"
    run = lambda *a: subprocess.run([sys.executable, "-m", "llmtraj.cli.app", "prompts", *a, "--prompts", str(ours)],  # noqa: E731
                                    capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    out = run("import-mlflow", store)
    assert out.returncode == 0, out.stderr
    assert "support" in out.stdout and "production→1" in out.stdout
    assert "You help {{customer}} with {{product}}." in run("show", "prompts:/support@production").stdout
    bad = run("show", "prompts:/support/7")
    assert bad.returncode == 2 and bad.stderr.strip() == "llm-traj: prompt 'support' has no version 7; it has 1-2"


def test_mlflow_read_live(store, tmp_path):
    live = open_registry(f"mlflow:{store}")
    assert isinstance(live, MlflowRegistry) and live.path == f"mlflow:{store}"
    assert live.get("prompts:/support@production").version == 1 and live.labels("support") == {"latest": 2, "production": 1}
    assert [v.version for v in live.versions("support")] == [1, 2] and live.names() == ["chat", "support"]
    tagger = PromptTagger(f"mlflow:{store}")
    tagged = tagger.tag("chat.completions", {"messages": [{"role": "system", "content": "You help Bo with modems."}]})
    assert (tagged["name"], tagged["version"], tagged["label"]) == ("support", 1, "production")
    with pytest.raises(PromptError, match="no label 'canary'"):
        live.get("support@canary")
    with pytest.raises(PromptError, match="read here: register prompts and move aliases with MLflow"):
        live.add("support", "x")
    # what changes in MLflow is read again, in the background, once the copy is older than its refresh time
    version = live.data_version()
    mlflow.genai.register_prompt(name="support", template="You help {{customer}}. Be kind.")
    mlflow.genai.set_prompt_alias("support", alias="production", version=3)
    live._refresh = 0.0
    deadline = time.monotonic() + 60
    while live.data_version() == version:
        assert time.monotonic() < deadline, "MLflow's change was never read"
        time.sleep(0.1)
    assert live.get("support@production").version == 3
    tagger._registry._refresh = 0.0  # the writer's copy, likewise
    while (tagged := tagger.tag("chat.completions", {"messages": [{"role": "system", "content": "You help Bo. Be kind."}]})).get("version") != 3:
        assert time.monotonic() < deadline, "the tagger never saw MLflow's change"
        time.sleep(0.1)
    assert tagged["label"] == "production"


def test_mlflow_that_cannot_be_read_is_one_line():
    with pytest.raises(PromptError, match=r"^prompt registry mlflow:nosuch://x: MLflow at nosuch://x: .*unsupported URI") as err:
        open_registry("mlflow:nosuch://x")
    assert "\n" not in str(err.value)


def test_cli_reads_mlflow_and_refuses_to_write_there(store, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "llmtraj.cli.app", "prompts", *a, "--prompts", f"mlflow:{store}"],  # noqa: E731
                                    capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    listing = run("list")
    assert listing.returncode == 0 and "support" in listing.stdout and "production→1" in listing.stdout
    assert run("show", "support@production").stdout.rstrip().endswith("You help {{customer}} with {{product}}.")
    (tmp_path / "p.txt").write_text("x")
    refused = run("add", "support", str(tmp_path / "p.txt"))
    assert refused.returncode == 2 and "register prompts and move aliases with MLflow" in refused.stderr
