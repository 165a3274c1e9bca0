"""What the stream tests of every API share: the fixtures and parsing them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtraj.apis.base import StreamAggregator
from llmtraj.sse import SSEBlock, SSEParser

STREAMS = Path(__file__).resolve().parents[1] / "fixtures" / "streams"


def expected_for(fixture: Path) -> dict[str, Any]:
    """The final object a fixture's stream aggregates to."""
    return json.loads((fixture.parent / (fixture.stem + ".expected.json")).read_text(encoding="utf-8"))


def request_for(fixture: Path) -> dict[str, Any]:
    """The request that would have produced a fixture's stream."""
    return json.loads((fixture.parent / (fixture.stem + ".request.json")).read_text(encoding="utf-8"))


def blocks_of(data: bytes) -> list[SSEBlock]:
    parser = SSEParser()
    return parser.feed(data) + parser.finish()


def fold(aggregator: StreamAggregator, blocks: list[SSEBlock]) -> StreamAggregator:
    for block in blocks:
        aggregator.add(block)
    return aggregator
