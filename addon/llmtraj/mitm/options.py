"""Declares the `llm_traj_*` options and validates them.

Every part validates its options in `configure` and raises `OptionsError`,
so mitmproxy rolls back a bad value set at runtime (`:set`, mitmweb's options
editor) and says why. At startup mitmproxy would print such an error with a
traceback and ignores misspelled `--set` names, so there each check is
reported as one line saying what to do (`startup_error`), which makes
mitmdump exit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import ctx, exceptions

from ..core.remote import RemoteError, check_url, default_stage, is_url, local_trajectory
from ..core.session import InvalidSession, validate_session
from ..upstreams.config import ConfigError as UpstreamConfigError
from ..upstreams.registry import Registry, load_registry

logger = logging.getLogger("llm_traj")

MODES = ("record", "replay", "anticall")


MAX_RETRIES = 20
# Seconds an upstream may send nothing before its call is given up (504): as
# long as mitmproxy's own connection idle limit (TCP_TIMEOUT in mitmproxy 11),
# which this replaces while a call is in flight.
DEFAULT_UPSTREAM_IDLE_TIMEOUT = "600"


@dataclass(frozen=True)
class Settings:
    mode: str
    path: Path
    default_session: str
    retries: int = 0
    config_path: str | None = None
    registry: Registry | None = None  # the upstream config's providers and models
    capture_tokens: bool = False  # llm_traj_capture_tokens: routes of the config may say otherwise
    remote: str | None = None  # llm_traj_path as an fsspec URL; `path` is then the local stage (replay: a copy)
    stage: Path | None = None  # with a URL: the local stage (replay: where its control file goes; `path` is a copy)
    upstream_idle_timeout: float | None = None  # llm_traj_upstream_idle_timeout; None: no limit

    @property
    def control_dir(self) -> Path:
        """Where the control file goes (`control_file_for`): the trajectory path, or a URL's stage."""
        return self.stage if self.stage is not None else self.path

    @property
    def routes_calls(self) -> bool:
        """Whether llm-traj chooses where calls go (a config, or retries), for
        which it needs each request body whole before forwarding it."""
        return self.registry is not None or self.retries > 0

    @property
    def why_lazy(self) -> str | None:
        """Why the proxy must not connect upstream before it has seen a request
        (mitmproxy's connection_strategy=lazy); None if it may."""
        if self.mode != "record":
            return f"llm_traj_mode={self.mode} answers calls without an upstream connection"
        if self.routes_calls:
            return "llm-traj chooses each call's upstream (llm_traj_config, llm_traj_retries) once it has the request"
        return None

    @property
    def may_capture_tokens(self) -> bool:
        """Whether some call may get token capture (which adds to the request body)."""
        return self.capture_tokens or (self.registry is not None and self.registry.captures_tokens)

    @property
    def needs_whole_request(self) -> bool:
        """Whether a request body is needed whole before it goes upstream (to route or add to it)."""
        return self.routes_calls or self.may_capture_tokens


def seconds_option(name: str) -> float:
    """The value of a (string) option of seconds, >= 0 (0: no limit); OptionsError if it is not one."""
    value = getattr(ctx.options, name)
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise exceptions.OptionsError(f"{name}={value!r} is not a number of seconds >= 0 (0: no limit)")
    return seconds


def startup_error(message: str) -> None:
    """Report a configuration error as one line. Errors logged during startup
    make mitmdump exit non-zero (its errorcheck addon)."""
    logger.error(f"llm-traj: {message}")


def check_set_values() -> None:
    """mitmproxy applies the `--set` values of a script's options right after
    its `load`, all in one go; when one does not parse (an int option given
    `abc`) it drops them all and the script silently does not load. So ours
    are applied here one by one first, a bad one reported as one line."""
    deferred = ctx.options.deferred
    for name in [n for n in deferred if n.startswith("llm_traj_") and n in ctx.options]:
        given = getattr(deferred[name], "val", None)  # `--set` strings (config.yaml values come typed)
        if given is None:
            continue
        del deferred[name]
        try:
            ctx.options.set(*(f"{name}={value}" for value in given)) if given else ctx.options.set(name)
        except exceptions.OptionsError as exc:
            startup_error(" ".join(f"--set {name}={value}" for value in given) + f": {exc}")


class LlmTrajOptions:
    """Owns the options; other addons read `settings`."""

    def __init__(self) -> None:
        self.settings: Settings | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "llm_traj_mode", str, "record",
            f"What llm-traj does with LLM calls: {', '.join(MODES)}.", choices=MODES,
        )
        loader.add_option(
            "llm_traj_path", str, "",
            "Where trajectories go: a directory of <session>.jsonl files, "
            "or a single file if the path ends in .jsonl. Required.",
        )
        loader.add_option(
            "llm_traj_stage", str, "",
            "With an fsspec URL as llm_traj_path (s3://bucket/prefix): the local directory calls are written to "
            "before each session's file is uploaded, and its control file (default: ~/.llm-traj/stage/<hash of the URL>).",
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
        loader.add_option(
            "llm_traj_upstream_idle_timeout", str, DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            "Seconds an upstream may send nothing (before its response head, or between two pieces of its body) "
            "before the call is given up: the agent gets a 504 (or its connection is closed mid-stream) and the "
            "record says upstream_timeout. 0: no limit. A route's timeouts in llm_traj_config take precedence.",
        )

    def configure(self, updated: set[str]) -> None:
        if any(name.startswith("llm_traj_") for name in updated):
            self.settings = self._validate(self.settings)  # on an OptionsError the old settings stay, as mitmproxy rolls back
            self._lazy_connections(user_set=False)
        elif "connection_strategy" in updated:
            self._lazy_connections(user_set=True)

    def _lazy_connections(self, user_set: bool) -> None:
        """Replay, anti-call and routed calls need connection_strategy=lazy:
        eager connects upstream before the request is seen, and a dead upstream
        would then drop the agent's connection with no record and no answer.
        A user setting it to eager meanwhile is refused; mitmproxy's default
        (eager) is switched, with a line saying so. Record mode keeps the
        user's value."""
        why = self.settings.why_lazy if self.settings is not None else None
        if why is None or ctx.options.connection_strategy == "lazy":
            return
        if user_set:
            raise exceptions.OptionsError(f"connection_strategy={ctx.options.connection_strategy}: {why}; "
                                          "llm-traj needs connection_strategy=lazy")  # fmt: skip
        logger.info(f"llm-traj: connection_strategy=lazy, as {why}")
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
    def _validate(previous: Settings | None) -> Settings:
        """The settings of the current options; OptionsError (one line saying what to do) if they do not work."""
        opts = ctx.options
        mode = opts.llm_traj_mode.strip().lower()
        if mode not in MODES:
            raise exceptions.OptionsError(
                f"llm_traj_mode={opts.llm_traj_mode!r} is not a mode; use one of: {', '.join(MODES)}"
            )
        if not opts.llm_traj_path:
            raise exceptions.OptionsError(
                "llm_traj_path is not set; add --set llm_traj_path=DIR (or FILE.jsonl) for the trajectory"
            )
        remote = stage = None
        if is_url(opts.llm_traj_path):
            remote = opts.llm_traj_path.rstrip("/")
            try:
                check_url(remote)
                stage = Path(opts.llm_traj_stage).expanduser() if opts.llm_traj_stage else default_stage(remote)
                if mode == "replay" and previous is not None and (previous.mode, previous.remote) == (mode, remote):
                    path = previous.path  # the copy fetched at startup: another option changing keeps the replay's place
                elif mode == "replay":
                    path = local_trajectory(remote)
                else:
                    path = stage
            except RemoteError as exc:
                raise exceptions.OptionsError(f"llm_traj_path: {exc}") from None
        elif opts.llm_traj_stage:
            raise exceptions.OptionsError("llm_traj_stage is only used when llm_traj_path is a URL (s3://...)")
        else:
            path = Path(opts.llm_traj_path).expanduser()
        target = path if path.suffix != ".jsonl" else path.parent
        if target.exists() and not target.is_dir():
            raise exceptions.OptionsError(f"llm_traj_path={opts.llm_traj_path!r}: {target} exists and is not a directory")
        try:
            validate_session(opts.llm_traj_session)
        except InvalidSession as exc:
            raise exceptions.OptionsError(f"llm_traj_session: {exc}") from None
        if not 0 <= opts.llm_traj_retries <= MAX_RETRIES:
            raise exceptions.OptionsError(f"llm_traj_retries={opts.llm_traj_retries} must be between 0 and {MAX_RETRIES}")
        idle = seconds_option("llm_traj_upstream_idle_timeout")
        registry = None
        if opts.llm_traj_config:
            try:
                registry = load_registry(opts.llm_traj_config, retries=opts.llm_traj_retries)
            except UpstreamConfigError as exc:
                raise exceptions.OptionsError(f"llm_traj_config: {exc}") from None
            for skipped in registry.skipped:
                logger.info(f"llm-traj: config: left out {skipped}")
        return Settings(mode=mode, path=path, default_session=opts.llm_traj_session, retries=opts.llm_traj_retries,
                        config_path=opts.llm_traj_config or None, registry=registry,
                        capture_tokens=opts.llm_traj_capture_tokens, remote=remote, stage=stage,
                        upstream_idle_timeout=idle or None)  # fmt: skip
