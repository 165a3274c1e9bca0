"""What the record writer (and the proxy's sink) keep per session: the values of
the sessions used last, within a count of sessions and a budget of bytes."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class SessionLRU(Generic[V]):
    """A value per session with its size in bytes; putting one drops the
    sessions used longest ago while there are more than `sessions` or their
    sizes add up to more than `budget`."""

    def __init__(self, sessions: int, budget: int) -> None:
        self._kept: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._sessions, self._budget, self._held = sessions, budget, 0

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def held(self) -> int:
        """The bytes kept (the sizes put, added up)."""
        return self._held

    def pop(self, session: str) -> tuple[V, int] | None:
        """Take the session's value and its size out, if kept."""
        kept = self._kept.pop(session, None)
        if kept is not None:
            self._held -= kept[1]
        return kept

    def get(self, session: str) -> V | None:
        kept = self._kept.get(session)
        return kept[0] if kept is not None else None

    def put(self, session: str, value: V, size: int) -> None:
        """Keep `value` (of `size` bytes) as the session's, used last (the
        session must not be kept already: `pop` it first)."""
        self._kept[session] = (value, size)
        self._held += size
        while self._kept and (len(self._kept) > self._sessions or self._held > self._budget):
            self._held -= self._kept.popitem(last=False)[1][1]

    def clear(self) -> None:
        self._kept.clear()
        self._held = 0
