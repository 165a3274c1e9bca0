"""Where LLM calls go: the upstream config (`llm_traj_config`, TOML or YAML)
and the registry made from it.

    default_route = "openai"              # provider of models not listed (optional)
    retries = 0                           # defaults for every route (each overridable)
    retry_statuses = [429, 500, 502, 503]

    [providers.openai]
    base_url = "https://api.openai.com/v1"   # the SDK-style base URL, version included
    kind = "openai"                          # openai | anthropic | vllm (OpenAI-compatible)
    api_key_env = "OPENAI_API_KEY"           # inject this key (the agent's is replaced)
    optional = true                          # skip the provider when that variable is unset

    [models."gpt-4o"]
    provider = "openai"
    upstream_model = "gpt-4o-2024-08-06"     # what the upstream is asked for
    aliases = ["gpt4o"]
    context_length = 128000
    tools = true

    [models."qwen3-32b"]                     # a self-hosted model: its own endpoint
    base_url = "http://gpu-7:8000/v1"
    kind = "vllm"                            # vllm | sglang: which fields ask for token ids
    capture_tokens = true                    # token ids and logprobs recorded (llm_traj_capture_tokens)
    sampling = {allow = ["max_tokens", "stop"], fixed = {temperature = 1.0, top_p = 1.0}}  # for RL
    upstream_api = "chat.completions"        # Anthropic Messages and Responses calls are bridged to chat

A request path maps onto a route's base URL after its own leading `/v1`:
`/v1/chat/completions` to `https://api.openai.com/v1` is
`https://api.openai.com/v1/chat/completions`, to `http://gpu-7:8000/v1` is
`http://gpu-7:8000/v1/chat/completions`. Knows nothing of mitmproxy.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..tokens.sampling import SAMPLING_KEYS

Kind = Literal["openai", "anthropic", "vllm", "sglang"]
# The API an upstream speaks (`upstream_api`): a call in another one is bridged
# (translated both ways, `llmtraj.bridge`); only chat completions can be bridged to.
UpstreamApi = Literal["chat.completions", "anthropic.messages", "responses", "completions"]
DEFAULT_RETRY_STATUSES = (429, 500, 502, 503)
# The headers an agent may carry its key in; all are replaced when a key is injected.
AUTH_HEADERS = ("authorization", "x-api-key", "api-key")
# The reverse target of a proxy that answers every LLM call itself (replay,
# anti-call) and was given no upstream: the discard port, never contacted.
NO_UPSTREAM = "http://127.0.0.1:9"


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Timeouts(_Strict):
    """Seconds; unset: no limit of our own."""

    connect: float | None = Field(None, gt=0, description="to open the upstream connection")
    first_byte: float | None = Field(None, gt=0, description="from sending the request to the response head")
    idle: float | None = Field(None, gt=0, description="between two pieces of the response body")


class Backoff(_Strict):
    initial: float = Field(0.5, ge=0, description="seconds before the first retry; doubled for each further one")
    max: float = Field(8.0, ge=0, description="cap of one wait")


class RetrySettings(_Strict):
    retries: int | None = Field(None, ge=0, le=20, description="extra attempts (default: llm_traj_retries)")
    retry_statuses: list[int] | None = None
    backoff: Backoff | None = None
    max_retry_wait: float | None = Field(
        None, ge=0, description="a Retry-After longer than this is not waited for: the response goes to the agent"
    )
    timeouts: Timeouts | None = None

    @field_validator("retry_statuses")
    @classmethod
    def _statuses(cls, value: list[int] | None) -> list[int] | None:
        for status in value or ():
            if not 400 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP error status (400-599)")
        return value


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL, e.g. https://api.openai.com/v1")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError(f"{value!r} has a bad port") from None
    return value.rstrip("/")


class Sampling(_Strict):
    """Sampling control for RL: what the agent may set, what the proxy imposes."""

    allow: list[str] | None = Field(None, description="sampling keys the agent may set; the others it sets are taken out")
    fixed: dict[str, Any] = Field(default_factory=dict, description="values imposed on every call (temperature, top_p, seed)")

    @field_validator("allow")
    @classmethod
    def _allowed(cls, value: list[str] | None) -> list[str] | None:
        _check_sampling_keys(value or ())
        return value

    @field_validator("fixed")
    @classmethod
    def _fixed(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_sampling_keys(value)
        return value


def _check_sampling_keys(keys) -> None:
    unknown = sorted(set(keys) - SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a sampling key; known: {', '.join(sorted(SAMPLING_KEYS))}")


class Endpoint(RetrySettings):
    base_url: str | None = None
    kind: Kind = "openai"
    api_key_env: str | None = Field(None, description="environment variable holding the key to inject")
    optional: bool = Field(False, description="skip (with a log line) instead of failing when api_key_env is unset")
    capture_tokens: bool | None = Field(None, description="ask the engine for token ids and logprobs (default: llm_traj_capture_tokens)")
    sampling: Sampling | None = None
    upstream_api: UpstreamApi | None = Field(
        None, description="the API the upstream speaks; calls in another API are bridged to it (chat.completions only)")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)


class ProviderConfig(Endpoint):
    base_url: str


class ModelConfig(Endpoint):
    provider: str | None = None
    upstream_model: str | None = None
    aliases: list[str] = []
    context_length: int | None = Field(None, gt=0)
    tools: bool | None = None
    vision: bool | None = None
    streaming: bool | None = None

    @model_validator(mode="after")
    def _one_endpoint(self) -> ModelConfig:
        if (self.provider is None) == (self.base_url is None):
            raise ValueError("give either provider (a name under [providers]) or base_url (its own endpoint)")
        return self


class UpstreamConfig(RetrySettings):
    default_route: str | None = Field(None, description="provider of the models not listed")
    providers: dict[str, ProviderConfig] = {}
    models: dict[str, ModelConfig] = {}


def _load_yaml(text: str) -> Any:
    from ruamel.yaml import (
        YAML,  # mitmproxy's own YAML library; only needed for YAML configs
    )
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe").load(text)
    except YAMLError as exc:
        raise ConfigError(f"not valid YAML: {' '.join(str(exc).split())}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {message}{more}" if where else message + more


def parse_table(text: str, suffix: str) -> dict[str, Any]:
    """The top-level table of a TOML or YAML settings file (by its suffix)."""
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        data = _load_yaml(text)
    else:
        raise ConfigError("the file name must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a table of settings")
    return data


def parse_config(text: str, suffix: str) -> UpstreamConfig:
    return _validated(parse_table(text, suffix))


def _validated(data: dict[str, Any]) -> UpstreamConfig:
    try:
        return UpstreamConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None


def read_table(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level table of a TOML or YAML settings file; errors name the file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return parse_table(text, path.suffix.lower())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def read_config(path: str | os.PathLike) -> UpstreamConfig:
    data = read_table(path)
    try:
        return _validated(data)
    except ConfigError as exc:
        raise ConfigError(f"{Path(path).expanduser()}: {exc}") from None


def key_variables(config: UpstreamConfig) -> set[str]:
    """The environment variables holding the keys the proxy injects (kept from agents)."""
    return {e.api_key_env for e in [*config.providers.values(), *config.models.values()] if e.api_key_env}
