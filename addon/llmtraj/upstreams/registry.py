"""The registry made of an upstream config: routes, retry policies, model entries, and
the `/v1/models` bodies. Knows nothing of mitmproxy."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from .config import (
    DEFAULT_RETRY_STATUSES,
    Backoff,
    ConfigError,
    Endpoint,
    Kind,
    RetrySettings,
    Sampling,
    Timeouts,
    UpstreamConfig,
    read_config,
)
from ..tokens.sampling import SamplingPolicy

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
    capture_tokens: bool | None = None  # None: as llm_traj_capture_tokens says
    sampling: SamplingPolicy | None = None
    upstream_api: str | None = None  # the API the upstream speaks (None: whatever the agent calls)

    def bridges(self, api: str) -> bool:
        """Whether a call in `api` is translated for this route's upstream (`llmtraj.bridge`)."""
        return self.upstream_api is not None and self.upstream_api != api

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

    @property
    def captures_tokens(self) -> bool:
        """Whether some route has token capture switched on."""
        return any(route.capture_tokens for route in [*self.routes, *(m.route for m in self.models)])

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


def _sampling(config: Sampling | None) -> SamplingPolicy | None:
    if config is None:
        return None
    return SamplingPolicy(frozenset(config.allow) if config.allow is not None else None, dict(config.fixed))


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
        routes[name] = Route(name, provider.base_url, provider.kind, key, _policy([provider, config], retries),
                             provider.capture_tokens, _sampling(provider.sampling), provider.upstream_api)  # fmt: skip
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
            capture = model.capture_tokens if model.capture_tokens is not None else provider.capture_tokens
            route = Route(base.name, base.base_url, base.kind, base.api_key, _policy([model, provider, config], retries),
                          capture, _sampling(model.sampling or provider.sampling),
                          model.upstream_api or provider.upstream_api)  # fmt: skip
        else:
            key, usable = _key(f"models.{name}", model, environ)
            if not usable:
                skipped.append(f"model {name} ({model.api_key_env} unset)")
                continue
            route = Route(f"model:{name}", model.base_url, model.kind, key, _policy([model, config], retries),
                          model.capture_tokens, _sampling(model.sampling), model.upstream_api)  # fmt: skip
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
