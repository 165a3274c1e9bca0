"""Declares the `llm_traj_*` options and validates them.

mitmproxy does not enforce `choices`, ignores misspelled `--set` names and
keeps a script running after its `configure` fails, so every check is done
here and a bad value stops startup with one line saying what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import ctx

from ..core.session import InvalidSession, validate_session
from ..upstreams.config import ConfigError as UpstreamConfigError
from ..upstreams.registry import Registry, load_registry

logger = logging.getLogger("llm_traj")

MODES = ("record", "replay", "anticall")


MAX_RETRIES = 20


@dataclass(frozen=True)
class Settings:
    mode: str
    path: Path
    default_session: str
    retries: int = 0
    config_path: str | None = None
    registry: Registry | None = None  # the upstream config's providers and models
    capture_tokens: bool = False  # llm_traj_capture_tokens: routes of the config may say otherwise

    @property
    def routes_calls(self) -> bool:
        """Whether llm-traj chooses where calls go (a config, or retries), for
        which it needs each request body whole before forwarding it."""
        return self.registry is not None or self.retries > 0

    @property
    def may_capture_tokens(self) -> bool:
        """Whether some call may get token capture (which adds to the request body)."""
        return self.capture_tokens or (self.registry is not None and self.registry.captures_tokens)

    @property
    def needs_whole_request(self) -> bool:
        """Whether a request body is needed whole before it goes upstream (to route or add to it)."""
        return self.routes_calls or self.may_capture_tokens


class ConfigError(ValueError):
    pass


def startup_error(message: str) -> None:
    """Report a configuration error as one line. Errors logged during startup
    make mitmdump exit non-zero (its errorcheck addon)."""
    logger.error(f"llm-traj: {message}")


class LlmTrajOptions:
    """Owns the options; other addons read `settings`."""

    def __init__(self) -> None:
        self.settings: Settings | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "llm_traj_mode", str, "record",
            f"What llm-traj does with LLM calls: {', '.join(MODES)}.",
        )
        loader.add_option(
            "llm_traj_path", str, "",
            "Where trajectories go: a directory of <session>.jsonl files, "
            "or a single file if the path ends in .jsonl. Required.",
        )
        loader.add_option(
            "llm_traj_session", str, "default",
            "Session of calls that name none (no /s/<session>/ path prefix, "
            "no x-llm-traj-session header).",
        )
        loader.add_option(
            "llm_traj_config", str, "",
            "Upstream config (.toml, .yaml): providers and models, routes by model name, "
            "keys to inject, retries and timeouts per route. Unset: calls go where the agent sent them.",
        )
        loader.add_option(
            "llm_traj_retries", int, 0,
            f"Extra attempts (0-{MAX_RETRIES}) for a call whose upstream fails before answering "
            "(connect error, 429, 500, 502, 503), with backoff. A route in llm_traj_config may set its own.",
        )
        loader.add_option(
            "llm_traj_capture_tokens", bool, False,
            "Record mode: ask the engine (vLLM, SGLang) for token ids and logprobs where the agent did not, "
            "record them as `tokens`, and pass the agent only what it asked for. "
            "capture_tokens in llm_traj_config sets it per provider or model.",
        )

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("llm_traj_") for name in updated):
            return
        try:
            self.settings = self._validate()
        except ConfigError as exc:
            self.settings = None
            startup_error(str(exc))
            return
        if ctx.options.connection_strategy != "lazy":
            # eager connects upstream before the request is seen: a dead upstream
            # would then drop the agent's connection with no record and no answer.
            ctx.options.update(connection_strategy="lazy")

    def running(self) -> None:
        unknown = sorted(name for name in ctx.options.deferred if name.startswith("llm_traj"))
        if unknown:
            startup_error(
                f"unknown option(s) {', '.join(unknown)}; known: "
                + ", ".join(sorted(n for n in ctx.options.keys() if n.startswith("llm_traj_")))
            )
            return
        if self.settings is None:
            return
        # One line that wrappers and tests wait for: the proxy is up, and where.
        server = ctx.master.addons.get("proxyserver")
        addrs = ", ".join(f"{host}:{port}" for host, port, *_ in server.listen_addrs())
        logger.info(f"llm-traj: ready, mode {self.settings.mode}, listening on {addrs}, path {self.settings.path}")

    @staticmethod
    def _validate() -> Settings:
        opts = ctx.options
        mode = opts.llm_traj_mode.strip().lower()
        if mode not in MODES:
            raise ConfigError(
                f"llm_traj_mode={opts.llm_traj_mode!r} is not a mode; use one of: {', '.join(MODES)}"
            )
        if not opts.llm_traj_path:
            raise ConfigError(
                "llm_traj_path is not set; add --set llm_traj_path=DIR (or FILE.jsonl) for the trajectory"
            )
        path = Path(opts.llm_traj_path).expanduser()
        target = path if path.suffix != ".jsonl" else path.parent
        if target.exists() and not target.is_dir():
            raise ConfigError(f"llm_traj_path={opts.llm_traj_path!r}: {target} exists and is not a directory")
        try:
            validate_session(opts.llm_traj_session)
        except InvalidSession as exc:
            raise ConfigError(f"llm_traj_session: {exc}") from None
        if not 0 <= opts.llm_traj_retries <= MAX_RETRIES:
            raise ConfigError(f"llm_traj_retries={opts.llm_traj_retries} must be between 0 and {MAX_RETRIES}")
        registry = None
        if opts.llm_traj_config:
            try:
                registry = load_registry(opts.llm_traj_config, retries=opts.llm_traj_retries)
            except UpstreamConfigError as exc:
                raise ConfigError(f"llm_traj_config: {exc}") from None
            for skipped in registry.skipped:
                logger.info(f"llm-traj: config: left out {skipped}")
        return Settings(mode=mode, path=path, default_session=opts.llm_traj_session, retries=opts.llm_traj_retries,
                        config_path=opts.llm_traj_config or None, registry=registry,
                        capture_tokens=opts.llm_traj_capture_tokens)  # fmt: skip
