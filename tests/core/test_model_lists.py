"""Model lists kept by record mode and answered by replay with no upstream."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from llmtraj.core.model_lists import KeptAnswer, OfflineModels, keep_answer, model_list_path, models_file, read_kept

OPENAI_LIST = {"object": "list", "data": [{"id": "gpt-x", "object": "model", "created": 1, "owned_by": "o"},
                                          {"id": "org/model-y", "object": "model", "created": 2, "owned_by": "o"}]}  # fmt: skip


def test_where_the_lists_are_kept():
    assert models_file(Path("traj")) == Path("traj/models.json")
    assert models_file(Path("runs/a.jsonl")) == Path("runs/a.models.json")


@pytest.mark.parametrize(
    ("path", "found"),
    [("/v1/models", ("/v1/models", None)), ("/v1/models?limit=5", ("/v1/models", None)), ("/models/", ("/models", None)),
     ("/v1/models/org/model-y", ("/v1/models/org/model-y", "org/model-y")), ("/v1/chat/completions", None),
     ("/v1/modelsx", None)],
)  # fmt: skip
def test_model_list_paths(path, found):
    assert model_list_path(path) == found


def test_keep_and_read_back_replacing_the_same_answer(tmp_path):
    file = tmp_path / "t" / "models.json"
    assert read_kept(file) == []
    keep_answer(file, KeptAnswer("api.example", "/v1/models", False, {"data": []}))
    keep_answer(file, KeptAnswer("api.example", "/v1/models", True, {"data": [], "has_more": False}))
    keep_answer(file, KeptAnswer("api.example", "/v1/models", False, OPENAI_LIST))
    kept = read_kept(file)
    assert [(a.anthropic, a.body) for a in kept] == [(True, {"data": [], "has_more": False}), (False, OPENAI_LIST)]
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert [p.name for p in file.parent.iterdir()] == ["models.json"]  # no temporary file left


def test_kept_answers_are_served_first():
    models = OfflineModels([KeptAnswer("api.example", "/v1/models", False, OPENAI_LIST)], [("recorded-m", False)])
    assert models.answer("unused", "/v1/models", False) == (200, OPENAI_LIST)
    assert models.answer("unused", "/v1/models/org/model-y", False) == (200, OPENAI_LIST["data"][1])
    assert models.answer("unused", "/v1/models/recorded-m", False)[1]["id"] == "recorded-m"
    status, body = models.answer("unused", "/v1/models/nope", False)
    assert status == 404 and body["error"]["code"] == "model_not_found" and "recorded-m" in body["error"]["message"]


def test_without_kept_answers_the_recorded_models_are_listed_in_the_api_s_shape():
    models = OfflineModels([], [("gpt-x", False), ("claude-y", True), ("gpt-x", False)])
    status, body = models.answer("h", "/v1/models", False)
    assert status == 200 and body["object"] == "list" and [m["id"] for m in body["data"]] == ["gpt-x"]
    status, body = models.answer("h", "/v1/models", True)
    assert body["has_more"] is False and body["data"][0] == {
        "type": "model", "id": "claude-y", "display_name": "claude-y", "created_at": "1970-01-01T00:00:00Z"}  # fmt: skip
    assert models.answer("h", "/v1/models/claude-y", True)[1]["type"] == "model"
