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
    kind = "vllm"

A request path maps onto a route's base URL after its own leading `/v1`:
`/v1/chat/completions` to `https://api.openai.com/v1` is
`https://api.openai.com/v1/chat/completions`, to `http://gpu-7:8000/v1` is
`http://gpu-7:8000/v1/chat/completions`. Knows nothing of mitmproxy.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Kind = Literal["openai", "anthropic", "vllm"]
DEFAULT_RETRY_STATUSES = (429, 500, 502, 503)
# The headers an agent may carry its key in; all are replaced when a key is injected.
AUTH_HEADERS = ("authorization", "x-api-key", "api-key")


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


class Endpoint(RetrySettings):
    base_url: str | None = None
    kind: Kind = "openai"
    api_key_env: str | None = Field(None, description="environment variable holding the key to inject")
    optional: bool = Field(False, description="skip (with a log line) instead of failing when api_key_env is unset")

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


# --- the registry made of a config ---------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 0
    statuses: tuple[int, ...] = DEFAULT_RETRY_STATUSES
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    max_retry_wait: float = 60.0
    connect_timeout: float | None = None
    first_byte_timeout: float | None = None
    idle_timeout: float | None = None

    @property
    def needs_client(self) -> bool:
        """Whether calls must go through llm-traj's own upstream client (retries
        or timeouts), rather than be forwarded by mitmproxy."""
        return bool(self.retries) or any(
            t is not None for t in (self.connect_timeout, self.first_byte_timeout, self.idle_timeout)
        )


@dataclass(frozen=True)
class Route:
    name: str  # the provider, or `model:<name>` for a model with its own endpoint
    base_url: str | None  # None: where the agent sent the call
    kind: Kind = "openai"
    api_key: str | None = field(default=None, repr=False)  # to inject; never logged or recorded
    policy: RetryPolicy = RetryPolicy()

    def url_for(self, path: str) -> str:
        """The upstream URL of a request path (query included)."""
        assert self.base_url is not None
        relative = path[3:] if path == "/v1" or path.startswith(("/v1/", "/v1?")) else path
        return self.base_url + relative

    def auth_headers(self) -> list[tuple[str, str]]:
        """The headers that carry the injected key (empty: the agent's own are kept)."""
        if self.api_key is None:
            return []
        if self.kind == "anthropic":
            return [("x-api-key", self.api_key)]
        return [("authorization", f"Bearer {self.api_key}")]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    route: Route
    upstream_model: str | None
    aliases: tuple[str, ...]
    capabilities: dict[str, Any]


@dataclass(frozen=True)
class Target:
    """Where one call goes."""

    route: Route
    model: ModelEntry | None  # None: sent on the default route

    @property
    def upstream_model(self) -> str | None:
        """The model name to put in the request instead of the agent's, if any."""
        return self.model.upstream_model if self.model is not None else None


class UnknownModel(LookupError):
    def __init__(self, model: str | None, known: list[str]) -> None:
        self.model = model
        self.known = known
        what = f"model {model!r} is not configured" if model else "the request names no model"
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        super().__init__(f"llm-traj: {what} and there is no default route; known models: {shown or 'none'}")


class Registry:
    """The providers and models of a config, with the keys resolved."""

    def __init__(self, models: list[ModelEntry], routes: list[Route], default: Route | None, skipped: list[str]) -> None:
        self.models = models
        self.routes = routes
        self.default = default
        self.skipped = skipped  # optional providers/models left out: their key variable is unset
        self.addresses = {address_of(route.base_url) for route in routes if route.base_url}  # (host, port) of each upstream
        self._by_name: dict[str, ModelEntry] = {}
        for entry in models:
            for name in (entry.name, *entry.aliases):
                self._by_name[name] = entry

    def target(self, model: Any) -> Target:
        entry = self._by_name.get(model) if isinstance(model, str) else None
        if entry is not None:
            return Target(entry.route, entry)
        if self.default is not None:
            return Target(self.default, None)
        raise UnknownModel(model if isinstance(model, str) else None, sorted(self._by_name))

    def model(self, name: str) -> ModelEntry | None:
        return self._by_name.get(name)


def address_of(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _policy(layers: list[RetrySettings], retries: int) -> RetryPolicy:
    """The retry policy of a route: the most specific layer that sets a value wins."""

    def pick(name: str, default: Any) -> Any:
        return next((getattr(layer, name) for layer in layers if getattr(layer, name) is not None), default)

    backoff = pick("backoff", Backoff())
    timeouts = pick("timeouts", Timeouts())
    return RetryPolicy(
        retries=pick("retries", retries),
        statuses=tuple(pick("retry_statuses", DEFAULT_RETRY_STATUSES)),
        backoff_initial=backoff.initial,
        backoff_max=backoff.max,
        max_retry_wait=pick("max_retry_wait", 60.0),
        connect_timeout=timeouts.connect,
        first_byte_timeout=timeouts.first_byte,
        idle_timeout=timeouts.idle,
    )


def _key(where: str, endpoint: Endpoint, environ: Mapping[str, str]) -> tuple[str | None, bool]:
    """(the key to inject, whether the endpoint is usable)."""
    if endpoint.api_key_env is None:
        return None, True
    key = environ.get(endpoint.api_key_env)
    if key:
        return key, True
    if endpoint.optional:
        return None, False
    raise ConfigError(
        f"{where}: environment variable {endpoint.api_key_env} (api_key_env) is not set; "
        "export it before starting the proxy, or mark the entry optional = true"
    )


def build_registry(config: UpstreamConfig, *, retries: int = 0, environ: Mapping[str, str] | None = None) -> Registry:
    """`retries`: the default number of extra attempts (`llm_traj_retries`)."""
    environ = os.environ if environ is None else environ
    skipped: list[str] = []
    routes: dict[str, Route] = {}
    for name, provider in config.providers.items():
        key, usable = _key(f"providers.{name}", provider, environ)
        if not usable:
            skipped.append(f"provider {name} ({provider.api_key_env} unset)")
            continue
        routes[name] = Route(name, provider.base_url, provider.kind, key, _policy([provider, config], retries))
    models: list[ModelEntry] = []
    names: dict[str, str] = {}
    for name, model in config.models.items():
        if model.provider is not None:
            provider = config.providers.get(model.provider)
            if provider is None:
                raise ConfigError(f"models.{name}: provider {model.provider!r} is not under [providers]; "
                                  f"known: {', '.join(config.providers) or 'none'}")
            if model.provider not in routes:
                skipped.append(f"model {name} (its provider {model.provider} is skipped)")
                continue
            base = routes[model.provider]
            route = Route(base.name, base.base_url, base.kind, base.api_key, _policy([model, provider, config], retries))
        else:
            key, usable = _key(f"models.{name}", model, environ)
            if not usable:
                skipped.append(f"model {name} ({model.api_key_env} unset)")
                continue
            route = Route(f"model:{name}", model.base_url, model.kind, key, _policy([model, config], retries))
        for alias in (name, *model.aliases):
            if alias in names:
                raise ConfigError(f"models.{name}: the name {alias!r} is also used by models.{names[alias]}")
            names[alias] = name
        capabilities = {
            k: v for k, v in model.model_dump(include={"context_length", "tools", "vision", "streaming"}).items()
            if v is not None
        }
        models.append(ModelEntry(name, route, model.upstream_model, tuple(model.aliases), capabilities))
    default = None
    if config.default_route is not None:
        if config.default_route not in config.providers:
            raise ConfigError(f"default_route {config.default_route!r} is not under [providers]; "
                              f"known: {', '.join(config.providers) or 'none'}")
        default = routes.get(config.default_route)
        if default is None:
            skipped.append("the default route (its provider is skipped)")
    all_routes = list({r.name: r for r in [*routes.values(), *(m.route for m in models)]}.values())
    return Registry(models, all_routes, default, skipped)


def _load_yaml(text: str) -> Any:
    from ruamel.yaml import YAML  # mitmproxy's own YAML library; only needed for YAML configs
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


def parse_config(text: str, suffix: str) -> UpstreamConfig:
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
    try:
        return UpstreamConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None


def read_config(path: str | os.PathLike) -> UpstreamConfig:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return parse_config(text, path.suffix.lower())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def key_variables(config: UpstreamConfig) -> set[str]:
    """The environment variables holding the keys the proxy injects (kept from agents)."""
    return {e.api_key_env for e in [*config.providers.values(), *config.models.values()] if e.api_key_env}


def load_registry(path: str | os.PathLike, *, retries: int = 0, environ: Mapping[str, str] | None = None) -> Registry:
    """The registry of a config file; ConfigError (one line, naming the file) when it cannot be used."""
    config = read_config(path)
    try:
        return build_registry(config, retries=retries, environ=environ)
    except ConfigError as exc:
        raise ConfigError(f"{Path(path).expanduser()}: {exc}") from None


# --- /v1/models ------------------------------------------------------------------


def model_object(entry: ModelEntry, created: int) -> dict[str, Any]:
    """A model as OpenAI's `GET /v1/models` lists it, with its capabilities."""
    return {
        "id": entry.name,
        "object": "model",
        "created": created,
        "owned_by": "self-hosted" if entry.route.name.startswith("model:") else entry.route.name,
        **({"aliases": list(entry.aliases)} if entry.aliases else {}),
        "capabilities": entry.capabilities,
    }


def models_list(registry: Registry, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(entry, created) for entry in registry.models]}
