"""Model lists for offline replay. Knows nothing of mitmproxy.

Record mode keeps the model-list answers it forwarded (`GET /v1/models`,
`GET /v1/models/{id}`) next to the trajectory, in `models.json` (a directory
path) or `<name>.models.json` (a single-file path). Replay answers those
requests from there, or, when record mode saw none, from the models the
recorded calls used, in the shape of the API asked (OpenAI's list, or
Anthropic's when the request carries `anthropic-version`).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PREFIXES = ("/v1/models", "/models")
_WRITING = threading.Lock()  # answers are kept from worker threads: one read-modify-write at a time


def models_file(traj_path: Path | str) -> Path:
    path = Path(traj_path)
    return path.with_name(path.stem + ".models.json") if path.suffix == ".jsonl" else path / "models.json"


def model_list_path(path: str) -> tuple[str, str | None] | None:
    """(the path without query, the model id or None for the list) if `path`
    asks for the model list or one model; None otherwise."""
    path = path.split("?", 1)[0]
    for prefix in _PREFIXES:
        if path == prefix or path == prefix + "/":
            return prefix, None
        if path.startswith(prefix + "/"):
            return path, path[len(prefix) + 1 :]  # ids may hold slashes: Qwen/Qwen3-32B
    return None


def is_anthropic(headers: Mapping[str, str]) -> bool:
    return "anthropic-version" in headers


@dataclass(frozen=True)
class KeptAnswer:
    host: str
    path: str
    anthropic: bool
    body: Any


def read_kept(file: Path) -> list[KeptAnswer]:
    """The answers kept by record mode; none if the file is absent."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: cannot read the kept model lists: {exc}") from None
    return [KeptAnswer(a["host"], a["path"], bool(a.get("anthropic")), a["body"]) for a in data.get("answers", [])]


def keep_answer(file: Path, answer: KeptAnswer) -> None:
    """Adds (or replaces, by host, path and API) one answer; written whole to a
    temporary file and renamed, so a reader never sees half a file. Called off
    the event loop."""
    with _WRITING:
        same = (answer.host, answer.path, answer.anthropic)
        answers = [a for a in read_kept(file) if (a.host, a.path, a.anthropic) != same]
        answers.append(answer)
        data = {"answers": [a.__dict__ for a in answers]}
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".models.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, ensure_ascii=False, indent=1)
            os.chmod(tmp, 0o600)
            os.replace(tmp, file)
        except BaseException:
            os.unlink(tmp)
            raise


class OfflineModels:
    """Answers model-list requests in replay."""

    def __init__(self, kept: Iterable[KeptAnswer], recorded: Iterable[tuple[str, bool]]) -> None:
        self.kept = list(kept)
        # (model, anthropic) in the order the recording first used them
        self.recorded = list(dict.fromkeys(recorded))

    def answer(self, host: str, path: str, anthropic: bool) -> tuple[int, Any]:
        """(status, JSON body) for a path `model_list_path` accepted."""
        found = model_list_path(path)
        assert found is not None
        key, model = found
        kept = self._kept(host, key, anthropic)
        if kept is not None:
            return 200, kept.body
        if model is None:
            return 200, self._list(anthropic)
        listed = self._kept(host, key[: -len(model) - 1], anthropic)  # /v1/models/x -> the list, /v1/models
        for entry in (listed.body.get("data", []) if listed is not None and isinstance(listed.body, dict) else []):
            if isinstance(entry, dict) and entry.get("id") == model:
                return 200, entry
        if any(name == model for name, _ in self.recorded):
            return 200, self._model(model, anthropic)
        known = ", ".join(name for name, _ in self.recorded) or "none"
        return 404, {"error": {"message": f"llm-traj replay: model {model!r} is not in the recording (it has: {known})",
                               "type": "invalid_request_error", "code": "model_not_found"}}  # fmt: skip

    def _kept(self, host: str, path: str, anthropic: bool) -> KeptAnswer | None:
        same_api = [a for a in self.kept if a.path == path and a.anthropic == anthropic]
        return next((a for a in same_api if a.host == host), same_api[0] if same_api else None)

    def _list(self, anthropic: bool) -> dict[str, Any]:
        names = [name for name, a in self.recorded if a == anthropic] or [name for name, _ in self.recorded]
        data = [self._model(name, anthropic) for name in names]
        if anthropic:
            return {"data": data, "has_more": False, "first_id": names[0] if names else None,
                    "last_id": names[-1] if names else None}  # fmt: skip
        return {"object": "list", "data": data}

    @staticmethod
    def _model(name: str, anthropic: bool) -> dict[str, Any]:
        if anthropic:
            return {"type": "model", "id": name, "display_name": name, "created_at": "1970-01-01T00:00:00Z"}
        return {"id": name, "object": "model", "created": 0, "owned_by": "llm-traj-replay"}
