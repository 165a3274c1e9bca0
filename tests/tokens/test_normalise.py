"""The normalised `tokens` field from vLLM's and SGLang's shapes (written after
their documented fields: SGLang's protocol.py), chat and completions, and from
an anti-call driver's `extra`; and continuity across a session's calls."""

from __future__ import annotations

import json
from pathlib import Path

from llmtraj.apis import API_BY_NAME
from llmtraj.tokens.capture import StreamHider, hide_in_body, plan_capture
from llmtraj.tokens.continuity import chains, continuity, first_difference
from llmtraj.tokens.normalise import tokens_from_extra, tokens_from_response

from ..streams import blocks_of, fold

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def chat_logprobs(*values: float) -> dict:
    return {"content": [{"token": "t", "logprob": v, "bytes": [116], "top_logprobs": []} for v in values]}


def test_vllm_chat_prompt_ids_on_top():
    final = {"object": "chat.completion", "system_fingerprint": "vllm-0.32.0", "prompt_token_ids": [1, 2, 3],
             "choices": [{"index": 0, "message": {}, "logprobs": chat_logprobs(-0.5, -0.25), "finish_reason": "stop",
                          "stop_reason": None, "token_ids": [7, 8]}], "usage": USAGE}  # fmt: skip
    assert tokens_from_response("chat.completions", final) == {
        "source": "vllm", "prompt_ids": [1, 2, 3],
        "choices": [{"index": 0, "completion_ids": [7, 8], "logprobs": [-0.5, -0.25], "finish_reason": "stop"}],
        "complete": True, "problems": []}  # fmt: skip


def test_sglang_chat_prompt_ids_per_choice_n2():
    choice = {"message": {}, "finish_reason": "length", "matched_stop": None, "prompt_token_ids": [1, 2, 3]}
    final = {"object": "chat.completion", "usage": {**USAGE, "completion_tokens": 3}, "choices": [
        {**choice, "index": 0, "logprobs": chat_logprobs(-1.0), "token_ids": [4]},
        {**choice, "index": 1, "logprobs": chat_logprobs(-1.0, -2.0), "token_ids": [5, 6]}]}  # fmt: skip
    tokens = tokens_from_response("chat.completions", final)
    assert tokens["source"] == "sglang" and tokens["prompt_ids"] == [1, 2, 3] and tokens["complete"]
    assert [c["completion_ids"] for c in tokens["choices"]] == [[4], [5, 6]]


def test_completions_per_choice_and_the_gaps_named():
    final = {"object": "text_completion", "usage": {**USAGE, "completion_tokens": 3}, "choices": [
        {"index": 0, "text": "ab", "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0]}, "finish_reason": "length",
         "stop_reason": None, "prompt_token_ids": [1], "token_ids": [2, 3]}]}  # fmt: skip
    tokens = tokens_from_response("completions", final)
    assert tokens["prompt_ids"] == [1] and not tokens["complete"]
    assert tokens["problems"] == ["choice 0: 2 ids but 1 logprobs",
                                  "2 completion ids but usage says 3 completion tokens (a tool or reasoning parser may "
                                  "have swallowed some: vllm#27482)"]  # fmt: skip


def test_no_ids_no_tokens_and_no_usage_is_a_problem():
    assert tokens_from_response("chat.completions", {"choices": [{"index": 0, "message": {}}]}) is None
    assert tokens_from_response("anthropic.messages", {"content": []}) is None
    streamed = tokens_from_response("chat.completions", {"prompt_token_ids": [1], "usage": None, "choices": [
        {"index": 0, "token_ids": [2], "logprobs": chat_logprobs(-1.0)}]})  # fmt: skip
    assert streamed["problems"] == ["no usage to check the completion ids against"] and not streamed["complete"]


def test_anticall_extra_flat_and_shaped():
    final = {"choices": [{"index": 0, "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}
    flat = tokens_from_extra({"prompt_token_ids": [1], "token_ids": [2, 3], "logprobs": [-1.0, -0.5]}, final)
    assert flat == {"source": "anticall", "prompt_ids": [1], "complete": True, "problems": [],
                    "choices": [{"index": 0, "completion_ids": [2, 3], "logprobs": [-1.0, -0.5], "finish_reason": "stop"}]}  # fmt: skip
    shaped = tokens_from_extra({"tokens": {"prompt_ids": [1], "choices": [
        {"index": 0, "completion_ids": [2, 3], "logprobs": [-1.0, -0.5], "finish_reason": "stop"}]}}, final)  # fmt: skip
    assert shaped == flat
    assert tokens_from_extra({"policy_version": 3}) is None


def tokens(prompt: list[int], completion: list[int]) -> dict:
    return {"prompt_ids": prompt, "choices": [{"index": 0, "completion_ids": completion, "logprobs": [-1.0] * len(completion)}]}


def test_continuity_and_causes():
    calls = [
        (1, tokens([1, 2], [3, 4])),
        (2, tokens([1, 2, 3, 4, 9], [5])),       # continues, with a tool result (9)
        (3, tokens([1, 2, 3, 4, 9, 6], [7])),    # the previous answer (5) came back as 6
        (4, tokens([1, 2], [8])),                # shorter: compaction
        (5, tokens([1, 9, 9], [8])),             # changed early
    ]  # fmt: skip
    report = continuity(calls)
    assert [(r["index"], r["continues"], r.get("position")) for r in report] == [
        (2, True, None), (3, False, 5), (4, False, 2), (5, False, 1)]  # fmt: skip
    assert "drops earlier reasoning" in report[1]["cause"]
    assert "compaction" in report[2]["cause"] and "side call" in report[3]["cause"]
    assert first_difference([1, 2], [1, 2, 3]) is None and first_difference([1, 2], [1]) == 1


def test_chains_mask_tool_tokens_and_survive_a_side_call():
    calls = [
        (1, tokens([1, 2], [3, 4])),
        (2, tokens([50, 51], [52])),             # a side call (a summary, say)
        (3, tokens([1, 2, 3, 4, 9, 9], [5])),    # continues call 1
    ]  # fmt: skip
    main, side = chains(calls)
    assert main.calls == [1, 3] and side.calls == [2]
    assert main.prompt_ids == [1, 2]
    assert main.response_ids == [3, 4, 9, 9, 5]
    assert main.response_mask == [1, 1, 0, 0, 1]
    assert main.response_logprobs == [-1.0, -1.0, 0.0, 0.0, -1.0]


FIXTURES = Path(__file__).parent / "fixtures"


def test_sglang_fixtures_normalise_and_hide():
    chat = json.loads((FIXTURES / "sglang_chat_tokens.json").read_text())
    tokens = tokens_from_response("chat.completions", chat)
    assert tokens["source"] == "sglang" and tokens["complete"], tokens["problems"]
    assert tokens["prompt_ids"][0] == 151644 and tokens["choices"][0]["completion_ids"] == [59604, 13, 151645]
    plan = plan_capture("chat.completions", {"model": "m", "messages": []}, "sglang")
    shown = json.loads(hide_in_body(json.dumps(chat).encode(), plan))["choices"][0]
    assert "prompt_token_ids" not in shown and "token_ids" not in shown and shown["logprobs"] is None

    stream = (FIXTURES / "sglang_completions_tokens.sse").read_bytes()
    final = fold(API_BY_NAME["completions"].new_aggregator(), blocks_of(stream)).result()
    tokens = tokens_from_response("completions", final)
    assert tokens["source"] == "sglang" and tokens["complete"], tokens["problems"]
    assert tokens["prompt_ids"] == [785, 6722, 315, 9625, 374] and tokens["choices"][0]["completion_ids"] == [12095, 13]
    plan = plan_capture("completions", {"model": "m", "prompt": "x", "stream": True}, "sglang")
    hider = StreamHider(plan)
    shown = hider.feed(stream) + hider.feed(b"")
    assert b"token_ids" not in shown and b'"usage":{' not in shown and hider.dropped == 1
    assert b'"logprobs":null,"finish_reason":"length","matched_stop":null}' in shown
