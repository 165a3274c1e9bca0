"""The record writer's side of token capture: from the bytes the engine sent,
the bytes the agent got (by the same rules the proxy applied as they passed,
so the record's events are the agent's) and the `tokens` field."""

from __future__ import annotations

from typing import Any

from pydantic_core import from_json

from ..apis import ApiShape
from ..core.sse import SSEParser
from ..recording.builder import fold_usual_blocks, usual_blocks
from .capture import CapturePlan, StreamHider, hide_in_body
from .normalise import tokens_from_extra, tokens_from_response


def plan_of(note: dict[str, Any]) -> CapturePlan:
    return CapturePlan(note["engine"], note["added"], frozenset(note["hidden"]))


def agent_chunks(chunks: list[bytes], plan: CapturePlan, stream: bool) -> tuple[list[bytes], dict[str, Any]]:
    """(what the agent got for each of the engine's chunks, in the same order
    (b"" where it got nothing then), what the record says of the rewriting)."""
    if not stream:
        body = b"".join(chunks)
        rewritten = hide_in_body(body, plan)
        return [rewritten], {"rewritten": [0] if rewritten is not body else [], "dropped": 0}
    hider = StreamHider(plan)
    out = [hider.feed(chunk) for chunk in chunks]
    out.append(hider.feed(b""))
    return out, {"rewritten": hider.rewritten, "dropped": hider.dropped}


def engine_final(api: ApiShape, chunks: list[bytes], stream: bool) -> Any:
    """The final object of the engine's own bytes: the JSON body, or its stream folded."""
    if not stream:
        try:
            return from_json(b"".join(chunks))
        except ValueError:
            return None
    aggregator = api.new_aggregator()
    body = b"".join(chunks)
    if (found := usual_blocks(body)) is not None:  # a few calls over the whole body
        _, raws, names, datas = found
        fold_usual_blocks(aggregator, names, datas, raws)
        return aggregator.result()
    parser = SSEParser()
    for chunk in chunks:
        for block in parser.feed(chunk):
            aggregator.add(block)
    for block in parser.finish():
        aggregator.add(block)
    return aggregator.result()


def tokens_of(api: ApiShape, final: Any, extra: dict[str, Any], engine: str | None = None) -> dict[str, Any] | None:
    """A record's `tokens`: from the engine's final object, or from what an
    anti-call driver attached (`extra`); None when neither has token ids."""
    return tokens_from_response(api.name, final, engine) or tokens_from_extra(extra, final)
