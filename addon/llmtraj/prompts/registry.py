"""The prompt registry: named system prompts, each version immutable and
numbered, labels that point at one version each (`latest` kept automatically).
One SQLite file, shared by the CLI, the proxy (overrides) and the record writer
(tagging), each with its own connection."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .template import Template, TemplateError, parse_template

LATEST = "latest"
REGISTRY_FILE = "prompts.sqlite"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_REF = re.compile(r"(?P<name>[^@/]+)(?:@(?P<label>[^@/]+)|/(?P<version>[^@/]+))?")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    text TEXT NOT NULL,
    messages TEXT,
    message TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS labels (
    name TEXT NOT NULL,
    label TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, label)
);
"""


class PromptError(ValueError):
    """A mistake in what was asked of the registry: one line, saying what to do."""


def text_hash(text: str) -> str:
    """How a record names a system prompt's text without holding it."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def default_registry_path(traj: os.PathLike | str | None = None) -> Path:
    """Beside the trajectories when they are known (a directory, or a .jsonl
    file's folder), else in the state directory (LLM_TRAJ_STATE_DIR, ~/.llm-traj)."""
    if traj is not None:
        path = Path(traj).expanduser()
        return (path.parent if path.suffix == ".jsonl" else path) / REGISTRY_FILE
    return Path(os.environ.get("LLM_TRAJ_STATE_DIR", Path.home() / ".llm-traj")) / REGISTRY_FILE


@dataclass(frozen=True)
class PromptRef:
    """NAME, NAME@LABEL or NAME/VERSION (NAME alone is NAME@latest), each also as MLflow writes it (prompts:/...)."""

    name: str
    label: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}/{self.version}"
        return f"{self.name}@{self.label or LATEST}"


MLFLOW_URI = "prompts:/"  # MLflow's way: prompts:/NAME/VERSION, prompts:/NAME@ALIAS


def parse_ref(text: str) -> PromptRef:
    text = text.strip()
    m = _REF.fullmatch(text.removeprefix(MLFLOW_URI))
    if m is None:
        raise PromptError(f"{text!r} is not a prompt reference; use NAME, NAME@LABEL or NAME/VERSION (or prompts:/ those)")
    name, label, version = m.group("name"), m.group("label"), m.group("version")
    check_name(name)
    if version is not None:
        if not version.isdigit() or int(version) < 1:
            raise PromptError(f"{text!r}: a version is a number from 1")
        return PromptRef(name, version=int(version))
    if label is not None:
        check_label(label)
    return PromptRef(name, label=label)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise PromptError(f"prompt name {name!r}: use 1-128 letters, digits, '.', '_', '-', starting with a letter or digit")
    return name


def check_label(label: str) -> str:
    if not _LABEL.fullmatch(label):
        raise PromptError(f"label {label!r}: use letters, digits, '.', '_', '-', starting with a letter")
    return label


@dataclass(frozen=True)
class PromptVersion:
    name: str
    version: int
    text: str  # the system prompt (for a chat prompt: its system messages' text)
    messages: list[dict[str, Any]] | None  # a chat prompt's messages, as given
    message: str  # the commit message
    tags: tuple[str, ...]
    created_at: float
    labels: tuple[str, ...] = field(default=())

    @property
    def template(self) -> Template:
        return parse_template(self.text)

    @property
    def label(self) -> str | None:
        """The label a record names for this version: a chosen one, else `latest` if it is."""
        chosen = [label for label in self.labels if label != LATEST]
        return chosen[0] if chosen else (LATEST if LATEST in self.labels else None)


def system_text_of_messages(messages: Any) -> str:
    """A chat prompt's system prompt: the text of its system/developer messages."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise PromptError("a chat prompt is a JSON list of messages, each with a role and content")
    texts = [m.get("content") for m in messages if m["role"] in ("system", "developer")]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise PromptError("a chat prompt needs a system or developer message whose content is text")
    return "\n\n".join(texts)


MLFLOW_SCHEME = "mlflow:"  # llm_traj_prompts=mlflow:TRACKING_URI: MLflow's prompt registry, read live


def open_registry(location: os.PathLike | str, *, create: bool = True) -> PromptRegistry:
    """The registry at `location`: a SQLite file (made if `create`), or
    `mlflow:TRACKING_URI`, MLflow's prompt registry read live (`from_mlflow.MlflowRegistry`)."""
    if str(location).startswith(MLFLOW_SCHEME):
        from .from_mlflow import MlflowRegistry

        return MlflowRegistry(str(location).removeprefix(MLFLOW_SCHEME))
    return PromptRegistry(location, create=create)


def registry_exists(location: os.PathLike | str) -> bool:
    return str(location).startswith(MLFLOW_SCHEME) or Path(location).expanduser().exists()


class PromptRegistry:
    def __init__(self, path: os.PathLike | str, *, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        if not create and not self.path.exists():
            raise PromptError(f"no prompt registry at {self.path}; add a prompt first (llm-traj prompts add)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PromptError(f"cannot open the prompt registry {self.path}: {exc}") from None
        self._open(self.path)

    @classmethod
    def in_memory(cls, where: str) -> PromptRegistry:
        """An empty registry in memory (a copy of one kept elsewhere, which `where` names in messages)."""
        registry = cls.__new__(cls)
        registry.path = where
        registry._open(":memory:")
        return registry

    def _open(self, target: Path | str) -> None:
        try:
            self._db = sqlite3.connect(target, timeout=10, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise PromptError(f"cannot open the prompt registry {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PromptRegistry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def data_version(self) -> int:
        """Changes when another connection commits: when to rebuild what was read."""
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    # ------------------------------------------------------------ writing

    def add(self, name: str, text: str | None = None, *, messages: list[dict[str, Any]] | None = None,
            message: str = "", tags: list[str] | None = None, labels: list[str] | None = None,
            created_at: float | None = None) -> tuple[PromptVersion, bool]:
        """A new version of `name` (version 1 for a new name), or the latest
        one if its content is the same (False); then `labels` point at it.
        `created_at` (default now) is for a version made elsewhere first."""
        check_name(name)
        for label in labels or ():
            check_label(label)
        if messages is not None:
            text = system_text_of_messages(messages)
        if not text or not text.strip():
            raise PromptError(f"prompt {name!r}: the text is empty")
        try:
            parse_template(text)
        except TemplateError as exc:
            raise PromptError(f"prompt {name!r}: {exc}") from None
        messages_json = json.dumps(messages, ensure_ascii=False) if messages is not None else None
        with self._transaction():
            row = self._db.execute(
                "SELECT version, text, messages FROM versions WHERE name=? ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
            created = row is None or (row[1], row[2]) != (text, messages_json)
            if created:
                version = 1 if row is None else row[0] + 1
                self._db.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (name, version, text, messages_json, message, json.dumps(sorted(set(tags or ()))),
                     time.time() if created_at is None else created_at),
                )
                self._set_label(name, LATEST, version)
            else:
                version = row[0]
            for label in labels or ():
                self._set_label(name, label, version)
        return self.get(PromptRef(name, version=version)), created

    def add_numbered(self, name: str, number: int, text: str | None = None, *,
                     messages: list[dict[str, Any]] | None = None, message: str = "", tags: list[str] | None = None,
                     labels: list[str] | None = None, created_at: float | None = None) -> bool:
        """Version `number` of `name` as it is elsewhere (an exported folder,
        MLflow): added if new (False if it is here already with the same
        content), keeping when it was made there; PromptError if it is here
        with other content or would get another number. Then `labels` point at it."""
        try:
            ours = self.get(PromptRef(name, version=number))
        except PromptError:
            ours = None
        if ours is None:
            made, _ = self.add(name, text, messages=messages, message=message, tags=tags, created_at=created_at)
            if made.version != number:
                raise PromptError(f"{name}/{number} would be version {made.version} here (versions missing before "
                                  f"it, or this registry has its own {name!r}); use another registry")  # fmt: skip
        elif ours.messages != messages or (messages is None and ours.text != text):
            raise PromptError(f"{name}/{number} is here already with other content; versions are immutable")
        for label in labels or ():
            self.set_label(name, number, label)
        return ours is None

    def set_label(self, name: str, version: int, label: str) -> PromptVersion:
        check_label(label)
        if label == LATEST:
            raise PromptError("`latest` always points at the newest version; choose another label")
        with self._transaction():
            self.get(PromptRef(name, version=version))  # exists?
            self._set_label(name, label, version)
        return self.get(PromptRef(name, version=version))

    def _set_label(self, name: str, label: str, version: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO labels VALUES (?, ?, ?)", (name, label, version))

    def _transaction(self):
        registry = self

        class Tx:
            def __enter__(self):
                registry._db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, *_):
                registry._db.execute("ROLLBACK" if kind else "COMMIT")

        return Tx()

    # ------------------------------------------------------------ reading

    def names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def get(self, ref: PromptRef | str) -> PromptVersion:
        """The version a reference names; PromptError for an unknown name, label or version."""
        if isinstance(ref, str):
            ref = parse_ref(ref)
        version = ref.version
        if version is None:
            row = self._db.execute(
                "SELECT version FROM labels WHERE name=? AND label=?", (ref.name, ref.label or LATEST)
            ).fetchone()
            if row is None:
                self._unknown_name(ref.name)
                known = ", ".join(self.labels(ref.name))
                raise PromptError(f"prompt {ref.name!r} has no label {ref.label!r}; its labels: {known}")
            version = row[0]
        found = self._versions("WHERE name=? AND version=?", (ref.name, version))
        if not found:
            self._unknown_name(ref.name)
            newest = self.get(PromptRef(ref.name)).version
            raise PromptError(f"prompt {ref.name!r} has no version {version}; it has 1-{newest}")
        return found[0]

    def versions(self, name: str) -> list[PromptVersion]:
        found = self._versions("WHERE name=?", (name,))
        if not found:
            self._unknown_name(name)
        return found

    def all_versions(self) -> list[PromptVersion]:
        return self._versions("", ())

    def labels(self, name: str) -> dict[str, int]:
        return dict(self._db.execute("SELECT label, version FROM labels WHERE name=? ORDER BY label", (name,)))

    def _unknown_name(self, name: str) -> None:
        if self._db.execute("SELECT 1 FROM versions WHERE name=? LIMIT 1", (name,)).fetchone() is None:
            known = ", ".join(self.names()) or "none yet"
            raise PromptError(f"no prompt named {name!r} in {self.path}; known: {known}")

    def _versions(self, where: str, args: tuple) -> list[PromptVersion]:
        labels: dict[tuple[str, int], list[str]] = {}
        for name, label, version in self._db.execute("SELECT name, label, version FROM labels ORDER BY label"):
            labels.setdefault((name, version), []).append(label)
        rows = self._db.execute(
            f"SELECT name, version, text, messages, message, tags, created_at FROM versions {where} ORDER BY name, version",
            args,
        )
        return [
            PromptVersion(name=name, version=version, text=text, messages=json.loads(messages) if messages else None,
                          message=message, tags=tuple(json.loads(tags)), created_at=created_at,
                          labels=tuple(labels.get((name, version), ())))  # fmt: skip
            for name, version, text, messages, message, tags, created_at in rows
        ]
