"""What drivers and the control API exchange (JSON bodies), shared by the
control server, the Python client and the OpenAPI description."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CallState = Literal["pending", "delivered", "streaming"]
DEFAULT_POLL = 30.0  # seconds a long poll waits by default
MAX_POLL = 300.0


class _Push(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CallInfo(BaseModel):
    """A held call: the agent is waiting for its answer."""

    id: str = Field(description="`<session>:<index>`")
    session: str
    index: int = Field(description="1-based position of the call in its session")
    api: str
    stream: bool = Field(description="whether the agent asked for a stream")
    state: CallState = Field(description="pending: no driver has it yet; delivered; streaming: deltas were pushed")
    created_at: float = Field(description="Unix time the agent's call arrived")


class Event(BaseModel):
    """What a driver waiting for work gets: a new call (`request`), a call it
    can no longer answer (`cancelled`: the agent hung up or the hold timed
    out), or the end of a session (`session_end`)."""

    type: Literal["request", "cancelled", "session_end"]
    session: str
    id: str | None = None
    index: int | None = None
    api: str | None = None
    stream: bool | None = None
    request: Any = Field(None, description="type request: the agent's JSON body (secret fields redacted)")
    created_at: float | None = None
    reason: str | None = Field(None, description="type cancelled / session_end: why")

    @property
    def session_end(self) -> bool:
        return self.type == "session_end"


class ResponsePush(_Push):
    """The whole answer: a full response object in the API's shape, or text
    (and tool calls) the proxy makes one from. `extra` goes to the trajectory
    record only (token ids, logprobs, metadata); the agent never sees it."""

    response: dict[str, Any] | None = Field(None, description="a full response, e.g. a chat.completion, sent as is")
    text: str | None = Field(None, description="instead of `response`: the assistant message's content")
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description='with `text`: [{"id"?, "function": {"name", "arguments": str or object}}]'
    )
    finish_reason: str | None = Field(None, description="with `text`: default stop, or tool_calls")
    usage: dict[str, Any] | None = Field(None, description="with `text`: default all zero")
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_form(self) -> ResponsePush:
        parts = self.text is not None or self.tool_calls is not None or self.finish_reason is not None or self.usage is not None
        if (self.response is None) == (not parts):
            raise ValueError("give either `response` (a full response object) or `text`/`tool_calls`, not both")
        return self


class DeltaPush(_Push):
    """One piece of a streamed answer."""

    text: str | None = Field(None, description="a content delta (shorthand for delta={'content': text})")
    delta: dict[str, Any] | None = Field(None, description="a choice delta in the API's shape, e.g. tool_calls fragments")
    index: int = Field(0, ge=0, description="the choice")
    finish_reason: str | None = None
    logprobs: Any = None
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_form(self) -> DeltaPush:
        if self.text is not None and self.delta is not None:
            raise ValueError("give `text` or `delta`, not both")
        return self

    def as_delta(self) -> dict[str, Any]:
        return {"content": self.text} if self.text is not None else dict(self.delta or {})


class FinishPush(_Push):
    """The end of a streamed answer."""

    finish_reason: str | None = Field(None, description="for the choices not finished yet: default stop, or tool_calls")
    usage: dict[str, Any] | None = Field(None, description="default all zero")
    extra: dict[str, Any] = {}


class ErrorPush(_Push):
    """Answer the agent with an error (in the API's error shape)."""

    status: int = Field(500, ge=400, le=599)
    message: str
    type: str = "server_error"
    code: str | None = None
    extra: dict[str, Any] = {}


class PushResult(BaseModel):
    id: str
    duplicate: bool = Field(False, description="the call was already answered: this push was ignored")


class EndSession(_Push):
    reason: str = "ended by a driver"


class SessionInfo(BaseModel):
    id: str
    state: Literal["active", "ended"]
    calls: int = Field(description="calls made so far")
    held: int = Field(description="calls waiting for an answer")
    created_at: float
    ended_at: float | None = None
    end_reason: str | None = None


class ApiErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None


class ApiError(BaseModel):
    error: ApiErrorBody


class ControlInfo(BaseModel):
    """The control file (`<llm_traj_path>/control.json`): the proxy's control
    token (for its control API and its trainer endpoints) and where the control
    API listens (`url`; None outside anti-call mode, which has none)."""

    url: str | None = None
    token: str
    pid: int | None = None
