"""The trajectory record: one JSON line per LLM call. Writer and reader share it."""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Version 2 lines store a call's request as a reference to an earlier call of
# its session plus what is new (`core.store`); read back, a record is whole.
# Version 3 lines are version 2 lines whose stream events include ones stored
# as their template's values (`core.chain.encode_events`): a reader of 1 and 2
# alone would fail on those events for want of their raw, so the line's version
# makes it refuse the line for what it is (the rest of a file may still read).
SCHEMA_VERSION = 2
TEMPLATE_VALUES_VERSION = 3
SCHEMA_VERSIONS = (1, 2, 3)

Headers = list[tuple[str, str]]


class StreamEvent(BaseModel):
    """One SSE block exactly as the client received it (after content decoding)."""

    t: float = Field(description="seconds from the start of the call to its arrival")
    raw: str
    raw_base64: str | None = Field(
        None, description="the block's exact bytes when they are not UTF-8 (`raw` then shows them with replacement characters)")

    def data(self) -> bytes:
        """The block's bytes as the client received them."""
        return base64.b64decode(self.raw_base64) if self.raw_base64 is not None else self.raw.encode()


class CallError(BaseModel):
    kind: Literal[
        "upstream_unreachable",
        "upstream_disconnected",
        "upstream_timeout",
        "client_disconnected",
        "bad_stream",
        "proxy",
    ]
    message: str


# The status an agent gets when its upstream failed before answering, by the
# record's error kind: the same whichever side forwarded the call (mitmproxy,
# or llm-traj's own client) and in replay.
NO_RESPONSE_STATUS = {"upstream_unreachable": 502, "upstream_disconnected": 502, "upstream_timeout": 504}


class Timings(BaseModel):
    """Unix times in seconds."""

    started_at: float
    response_headers_at: float | None = None
    first_byte_at: float | None = None
    ended_at: float | None = None


class Attempt(BaseModel):
    started_at: float
    waited: float = Field(0, description="seconds of backoff before this attempt")
    status: int | None = None
    error: str | None = Field(None, description="why no response came")


class Upstream(BaseModel):
    """Where llm-traj sent the call, when its config or retries chose it."""

    route: str
    url: str
    model: str | None = Field(None, description="the model name sent upstream, when the config rewrote it")
    attempts: list[Attempt] | None = Field(None, description="each try, when the route retries or has timeouts")
    error: str | None = Field(None, description="why the call failed or the response stopped")
    sampling: dict[str, Any] | None = Field(
        None, description="the route's sampling control: `removed` keys the agent set, `fixed` values imposed")


class TokenChoice(BaseModel):
    index: int
    completion_ids: list[int] | None = None
    logprobs: list[float | None] | None = Field(None, description="of each completion id, in order")
    finish_reason: str | None = None


class Tokens(BaseModel):
    """The exact tokens of a call, one shape whatever the engine (see `llmtraj.tokens.normalise`)."""

    source: str = Field(description="vllm, sglang, or anticall (a driver's `extra`)")
    prompt_ids: list[int] | None = None
    choices: list[TokenChoice] = Field(default_factory=list)
    complete: bool = Field(description="every choice's ids and logprobs line up and add up to the usage's completion tokens")
    problems: list[str] = Field(default_factory=list)


class TokenCapture(BaseModel):
    """What token capture did to the call (`llm_traj_capture_tokens`)."""

    engine: str
    added: dict[str, Any] = Field(description="fields added to the agent's request upstream")
    hidden: list[str] = Field(description="what the agent did not ask for and so did not get: token_ids, logprobs, usage")
    rewritten: list[int] = Field(default_factory=list, description="positions in `events` (0 for a body) the proxy rewrote")
    dropped: int = Field(0, description="events the agent did not get at all (the usage only the proxy asked for)")
    passed_unchanged: bool = Field(False, description="the engine compressed its response: passed on as it came")


class Bridge(BaseModel):
    """The upstream side of a bridged call (`upstream_api` on its route): the
    record's own `request`, `response` and `events` are the agent's, in its API."""

    upstream_api: str = Field(description="the API the upstream speaks: chat.completions")
    url: str
    request: Any = Field(None, description="the translated request as sent upstream, secret fields redacted")
    status: int | None = Field(None, description="the upstream's status (None: no response came)")
    stream: bool = False
    response: Any = Field(None, description="the upstream's final object: its JSON body, or its stream folded")
    events: int = Field(0, description="how many SSE blocks the upstream's stream had")
    event_times: list[float] = Field(
        default_factory=list, description="seconds from `first_byte_at` to the arrival of each of those blocks")
    first_byte_at: float | None = None
    ended_at: float | None = None
    problems: list[str] = Field(default_factory=list, description="upstream events that could not be aggregated")


class PromptTag(BaseModel):
    """Which registered system prompt the call was sent with (see llmtraj.prompts)."""

    name: str | None = None
    version: int | None = None
    label: str | None = Field(None, description="a label of that version when recorded (else latest, if it was)")
    match: Literal["exact", "template", "none"]
    variables: dict[str, str] = Field(default_factory=dict, description="a template's placeholders as filled in")
    hash: str | None = Field(None, description="hash of the system prompt as sent (None: the call had none)")
    override: str | None = Field(None, description="the reference (or A/B arm) that replaced the agent's prompt")
    original_hash: str | None = Field(None, description="hash of the agent's own system prompt, when overridden")


class CallRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1, 2, 3] = SCHEMA_VERSION
    session: str
    index: int = Field(ge=1, description="1-based position of the call in its session")
    api: str
    mode: str
    method: str
    url: str = Field(description="where the call went, session prefix removed")
    request_headers: Headers
    request: Any = Field(None, description="the request body as JSON, secret fields redacted")
    request_raw: str | None = Field(None, description="the request body when it was not JSON")
    request_raw_base64: str | None = Field(
        None, description="the request body's exact bytes when it was neither JSON nor UTF-8 (`request_raw` then has replacement characters)")
    status: int | None = None
    response_headers: Headers = Field(default_factory=list)
    stream: bool = False
    response: Any = Field(None, description="the final object: the JSON body or the aggregated stream")
    response_raw: str | None = Field(None, description="the response body when it was not JSON")
    response_raw_base64: str | None = Field(
        None, description="the response body's exact bytes when it was neither JSON nor UTF-8 (`response_raw` then has replacement characters)")
    events: list[StreamEvent] | None = Field(None, description="the SSE blocks of a streamed response")
    complete: bool = True
    error: CallError | None = None
    problems: list[str] = Field(default_factory=list, description="events that could not be aggregated")
    timings: Timings
    upstream: Upstream | None = None
    prompt: PromptTag | None = Field(None, description="the call's system prompt in the prompt registry")
    extra: dict[str, Any] = Field(default_factory=dict)
    tokens: Tokens | None = Field(None, description="token ids and logprobs, when the engine or a driver gave them")
    capture: TokenCapture | None = None
    weight_version: str | int | None = Field(
        None, description="the trainer's policy version when the call came in (`ProxyPool.set_weight_version`)"
    )
    bridge: Bridge | None = Field(None, description="the upstream side, when the call was bridged to another API")
