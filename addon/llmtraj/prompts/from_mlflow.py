"""MLflow's prompt registry as a source (the optional extra `llm-traj[mlflow]`),
read live (`MlflowRegistry`, for `llm_traj_prompts=mlflow:TRACKING_URI`) or
copied into a registry of ours (`llm-traj prompts import-mlflow`): prompts with
their version numbers, commit messages, tags, creation times and aliases (as
labels), so calls are tagged with MLflow's versions and an override can name
them as MLflow does (`prompts:/NAME/VERSION`, `prompts:/NAME@ALIAS`). Copying
again adds only the versions that are new and moves the labels as the aliases
moved. Works with any MLflow tracking URI; a local one (`sqlite:///mlflow.db`)
needs no server."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .registry import LATEST, MLFLOW_SCHEME, PromptError, PromptRef, PromptRegistry, PromptVersion

logger = logging.getLogger("llm_traj")

REFRESH_SECONDS = 5.0  # how stale a live copy of MLflow's prompts may be read before it is copied again


@dataclass(frozen=True)
class Copied:
    name: str
    added: list[int]  # version numbers new to our registry
    versions: int
    labels: dict[str, int]


def _client(tracking_uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise PromptError("MLflow is not installed; pip install 'llm-traj[mlflow]'") from None
    try:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except Exception as exc:  # an unsupported URI, say
        raise PromptError(f"MLflow at {tracking_uri}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip().splitlines()[0]


def _all(search, *args):
    """Every item of a paged MLflow search."""
    token = None
    while True:
        page = search(*args, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def copy_from_mlflow(registry: PromptRegistry, tracking_uri: str, names: list[str] | None = None, client=None) -> list[Copied]:
    client = client or _client(tracking_uri)
    try:
        names = names or sorted(p.name for p in _all(client.search_prompts, None))
        return [_copy_prompt(registry, client, name) for name in names]
    except PromptError:
        raise
    except Exception as exc:  # MLflow's own errors, its store's (SQLAlchemy, HTTP): one line
        raise PromptError(f"MLflow at {tracking_uri}: {_first_line(exc)}") from None


def _copy_prompt(registry: PromptRegistry, client, name: str) -> Copied:
    versions = sorted(_all(client.search_prompt_versions, name), key=lambda v: int(v.version))
    if not versions:
        raise PromptError(f"MLflow has no prompt named {name!r}")
    added, labels = [], {}
    for mlflow_version in versions:
        number = int(mlflow_version.version)
        template = mlflow_version.template
        text, messages = (template, None) if isinstance(template, str) else (None, template)
        aliases = [a for a in client.get_prompt_version(name, number).aliases or () if a != LATEST]
        tags = [f"{k}={v}" for k, v in (mlflow_version.tags or {}).items() if not k.startswith(("mlflow.", "_"))]
        created = mlflow_version.creation_timestamp
        if registry.add_numbered(name, number, text, messages=messages, message=mlflow_version.commit_message or "",
                                 tags=tags, labels=aliases, created_at=created / 1000 if created else None):  # fmt: skip
            added.append(number)
        labels.update(dict.fromkeys(aliases, number))
    return Copied(name, added, len(versions), labels)


class MlflowRegistry:
    """MLflow's prompt registry read live: what MLflow has is copied into a
    registry in memory when this opens, and copied again in the background
    when it is read more than `refresh` seconds after the last copy, so that
    no reader waits on MLflow (the proxy choosing a session's override on its
    loop, the record writer tagging each call) and a version registered or an
    alias moved in MLflow is seen within seconds, by sessions that start
    after it (a session keeps the version it started with). `data_version`
    changes when a copy differs from the one before. Read-only: prompts are
    registered and aliased with MLflow itself."""

    def __init__(self, tracking_uri: str, refresh: float = REFRESH_SECONDS) -> None:
        self.tracking_uri = tracking_uri
        self.path = MLFLOW_SCHEME + tracking_uri  # how messages name it
        self._refresh = refresh
        try:
            self._client = _client(tracking_uri)
            self._copy, self._content = self._copied()
        except PromptError as exc:  # MLflow cannot be read now
            raise PromptError(f"prompt registry {self.path}: {exc}") from None
        self._copied_at = time.monotonic()
        self._changes = 0
        self._copying = threading.Lock()

    def _copied(self) -> tuple[PromptRegistry, list[PromptVersion]]:
        copy = PromptRegistry.in_memory(self.path)
        copy_from_mlflow(copy, self.tracking_uri, client=self._client)
        return copy, copy.all_versions()

    def _current(self) -> PromptRegistry:
        if time.monotonic() - self._copied_at > self._refresh and self._copying.acquire(blocking=False):
            threading.Thread(target=self._copy_again, name="llm-traj MLflow prompts", daemon=True).start()
        return self._copy  # one copy per read: a read never mixes two (they are swapped whole)

    def _copy_again(self) -> None:
        try:
            copy, content = self._copied()
            if content != self._content:
                self._copy, self._content = copy, content
                self._changes += 1
        except PromptError as exc:  # the last copy stays in use
            logger.warning(f"llm-traj: prompt registry {self.path}: {exc}")
        finally:
            self._copied_at = time.monotonic()
            self._copying.release()

    def data_version(self) -> int:
        self._current()
        return self._changes

    def get(self, ref: PromptRef | str) -> PromptVersion:
        return self._current().get(ref)

    def versions(self, name: str) -> list[PromptVersion]:
        return self._current().versions(name)

    def all_versions(self) -> list[PromptVersion]:
        return self._current().all_versions()

    def labels(self, name: str) -> dict[str, int]:
        return self._current().labels(name)

    def names(self) -> list[str]:
        return self._current().names()

    def _read_only(self, *args, **kwargs):
        raise PromptError(f"{self.path} is MLflow's prompt registry, read here: register prompts and move aliases "
                          "with MLflow (mlflow.genai.register_prompt, set_prompt_alias)")  # fmt: skip

    add = add_numbered = set_label = _read_only

    def close(self) -> None:
        pass

    def __enter__(self) -> MlflowRegistry:
        return self

    def __exit__(self, *exc) -> None:
        pass
