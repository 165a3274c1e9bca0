"""Rows for RL trainers from the records' `tokens`, in the field names of verl's
agent loop (`prompt_ids`, `response_ids`, `response_mask`,
`response_logprobs`): `per_call` one row per choice of a call, `per_session`
one row per linear chain of a session's calls (`tokens.continuity.chains`:
`response_ids` runs over the rest of the chain, the mask is 1 on the tokens
the model produced and 0 on the tool, user and template tokens in between;
a chain breaks where a call does not continue it). JSON lines, or Parquet
(pyarrow) for an output file ending in `.parquet`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ...core.record import CallRecord
from ...core.store import private_opener
from ...tokens.continuity import chains
from .common import Skipped


def _with_tokens(records: Iterable[CallRecord], skipped: list[Skipped] | None) -> Iterator[tuple[CallRecord, dict[str, Any]]]:
    for record in records:
        if record.tokens is None or record.tokens.prompt_ids is None:
            if skipped is not None:
                skipped.append(Skipped(record.session, record.index, "no token ids (record with llm_traj_capture_tokens)"))
            continue
        yield record, record.tokens.model_dump()


def per_call_rows(records: Iterable[CallRecord], skipped: list[Skipped] | None = None) -> Iterator[dict[str, Any]]:
    for record, tokens in _with_tokens(records, skipped):
        for choice in tokens["choices"]:
            ids = choice["completion_ids"]
            if ids is None:
                continue
            yield {"session": record.session, "index": record.index, "choice": choice["index"],
                   "prompt_ids": tokens["prompt_ids"], "response_ids": ids, "response_mask": [1] * len(ids),
                   "response_logprobs": choice["logprobs"] or [0.0] * len(ids),
                   "finish_reason": choice["finish_reason"], "complete": tokens["complete"]}  # fmt: skip


def per_session_rows(records: Iterable[CallRecord], skipped: list[Skipped] | None = None) -> Iterator[dict[str, Any]]:
    sessions: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for record, tokens in _with_tokens(records, skipped):
        sessions.setdefault(record.session, []).append((record.index, tokens))
    for session, calls in sessions.items():
        complete = {index: tokens["complete"] for index, tokens in calls}
        for number, chain in enumerate(chains(calls), 1):
            yield {"session": session, "chain": number, "calls": chain.calls, "num_turns": len(chain.calls),
                   "prompt_ids": chain.prompt_ids, "response_ids": chain.response_ids,
                   "response_mask": chain.response_mask, "response_logprobs": chain.response_logprobs,
                   "complete": all(complete[i] for i in chain.calls)}  # fmt: skip


def token_rows(records: Iterable[CallRecord], granularity: str, skipped: list[Skipped] | None = None) -> Iterator[dict[str, Any]]:
    return (per_session_rows if granularity == "per_session" else per_call_rows)(records, skipped)


def write_parquet(rows: Iterable[dict[str, Any]], path: Path) -> int:
    """Rows to a Parquet file; how many. ImportError saying what to install without pyarrow."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("writing Parquet needs pyarrow: pip install pyarrow (or export to .jsonl)") from None
    table = pa.Table.from_pylist(list(rows))
    with open(path, "wb", opener=private_opener) as sink:  # conversations: the owner's only
        pq.write_table(table, sink)
    return table.num_rows
