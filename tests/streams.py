"""What the stream tests of every API share: the fixtures and parsing them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from llmtraj.apis.base import StreamAggregator
from llmtraj.core.sse import SSEBlock, SSEParser
from llmtraj.testing.standin import FIXTURES

STREAMS = FIXTURES


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


def fold_in_pieces(aggregator: StreamAggregator, data: bytes, rng: random.Random) -> StreamAggregator:
    """`data` fed to a parser in random pieces of 1-9 bytes, as a network might cut it."""
    parser, at = SSEParser(), 0
    while at < len(data):
        step = rng.randint(1, 9)
        fold(aggregator, parser.feed(data[at : at + step]))
        at += step
    return fold(aggregator, parser.finish())
