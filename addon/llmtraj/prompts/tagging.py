"""Tagging in the record writer: each call's system prompt matched against the
registry, the index rebuilt only when the registry changed."""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from .matching import PromptIndex, prompt_tag, system_segments
from .registry import PromptError, PromptRegistry, open_registry, registry_exists

_RECHECK = 1.0  # seconds between looks for a registry that does not exist yet


class PromptTagger:
    def __init__(self, location: Path | str) -> None:
        self.location = str(location)  # a file, or mlflow:TRACKING_URI
        self._registry: PromptRegistry | None = None
        self._index: PromptIndex | None = None
        self._data_version: int | None = None
        self._next_look = 0.0

    def index(self) -> PromptIndex | None:
        try:
            if self._registry is None:
                if time.monotonic() < self._next_look:
                    return None
                self._next_look = time.monotonic() + _RECHECK
                if not registry_exists(self.location):
                    return None
                self._registry = open_registry(self.location, create=False)
            data_version = self._registry.data_version()
            if data_version != self._data_version:
                self._index = PromptIndex(self._registry.all_versions())
                self._data_version = data_version
        except (sqlite3.Error, PromptError) as exc:  # calls are still recorded, untagged
            print(f"llm-traj: prompt registry {self.location}: {exc}", file=sys.stderr, flush=True)
            self._registry = None
        return self._index

    def tag(self, api: str, request: Any, sent: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The record's `prompt` (None while there is no registry); `sent` is what
        the proxy noted of an override (the reference that chose the version
        sent, the agent's own prompt's hash)."""
        index = self.index()
        if index is None and not sent:
            return None
        tag = prompt_tag(system_segments(api, request), index)
        return {**tag, **sent} if sent else tag
