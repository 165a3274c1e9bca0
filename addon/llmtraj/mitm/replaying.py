"""Replay mode: answers every LLM call from the recording at llm_traj_path
(matching is `llmtraj.replay`'s), in `request`, so no upstream connection is
ever opened for it. A miss is answered with an error, or forwarded upstream
(and recorded elsewhere), as llm_traj_replay_miss says.

Whole answers are set as the flow's response at once (the cheapest path); a
stream paced at its recorded speed, and a call that was cut short when
recorded, are written by the loopback server so that they go out as they did.
Replayed flows are marked as mitmproxy's server replay marks them
(`flow.is_replay == "response"`). The report so far: the command
`llm_traj.replay.report`, or `GET /llm-traj/replay-report` (`endpoints`).
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import command, ctx, exceptions, http

from ..core.headers import text_headers
from ..replay import Miss, Replay, ReplayLoadError, load
from ..replay.matching import DEFAULT_IGNORE, EXACT, LATER, NEAREST, NORMALIZED, POSITION
from ..replay.normalize import Normalizer, RuleError, load_rules
from ..replay.replies import MATCH_HEADER, reply_body
from .loopback import Loopback, ProducedResponse
from .options import LlmTrajOptions
from .recording import Recorder
from .routing import CALL_KEY, CallMetadata, error_response, llm_call

logger = logging.getLogger("llm_traj")

MISS_POLICIES = ("error", "forward", "forward-record")
_RUNG_HEADERS = {rung: ((MATCH_HEADER, rung.encode()),) for rung in (EXACT, LATER, NORMALIZED, NEAREST, POSITION)}


@dataclass(frozen=True)
class ReplaySettings:
    miss: str
    position: bool
    speed: float
    ignore: frozenset[str]
    record_path: Path | None
    nearest: bool
    rules: str  # the rules file, "" for the built-in presets only
    normalizer: Normalizer


class Replayer:
    def __init__(self, options: LlmTrajOptions, loopback: Loopback, recorder: Recorder) -> None:
        self._options = options
        self._loopback = loopback
        self._recorder = recorder
        self._settings: ReplaySettings | None = None
        self._replay: Replay | None = None
        self._source: tuple[Path, frozenset[str]] | None = None  # what _replay was loaded from
        self._broken = False  # replay mode, but the configuration failed: refuse calls rather than forward them
        self._log_exact = False  # a line for every exact match too (termlog_verbosity=debug)

    def load(self, loader) -> None:
        loader.add_option(
            "llm_traj_replay_miss", str, "error",
            "Replay: what to do with a call the recording does not have: error (an OpenAI-shaped 400 "
            "naming the session, the step and the first difference), forward (to the upstream), "
            "forward-record (and record it to llm_traj_replay_record_path).", choices=MISS_POLICIES,
        )
        loader.add_option(
            "llm_traj_replay_record_path", str, "",
            "Replay with llm_traj_replay_miss=forward-record: where the forwarded calls are recorded "
            "(a directory or a .jsonl file, not llm_traj_path).",
        )
        loader.add_option(
            "llm_traj_replay_position", bool, False,
            "Replay: when a request matches no recorded call, answer with the call at the session's "
            "cursor anyway (match by position).",
        )
        loader.add_option(
            "llm_traj_replay_speed", str, "0",
            "Replay: pace of recorded streams: 0 = at once, 1 = as recorded, 2 = twice as fast.",
        )
        loader.add_option(
            "llm_traj_replay_ignore", str, ",".join(DEFAULT_IGNORE),
            "Replay: top-level request fields (comma-separated) ignored when matching a request to the recording.",
        )
        loader.add_option(
            "llm_traj_replay_rules", str, "",
            "Replay: a file (.toml, .yaml) of normalisation rules added to the agent presets, overriding or "
            "switching off built-in ones (`llm-traj replay-rules` lists them).",
        )
        loader.add_option(
            "llm_traj_replay_nearest", bool, False,
            "Replay: when a request matches no recorded call even after normalisation, answer with the "
            "unserved call of the same shape whose text is most similar (reported with its score and differences).",
        )

    def configure(self, updated: set[str]) -> None:
        if "termlog_verbosity" in updated:
            self._log_exact = ctx.options.termlog_verbosity == "debug"
        if not any(name.startswith("llm_traj_") for name in updated):
            return
        settings = self._options.settings
        if settings is None or settings.mode != "replay":
            self._close_replay()
            self._settings = self._replay = self._source = None
            self._broken = False
            self._recorder.marked_path = None
            return
        try:
            replay_settings = _read_settings(settings.path)
            source = (settings.path, replay_settings.ignore, replay_settings.rules)
            if source != self._source:  # reloading resets every cursor: only when the recording changes
                replay = load(settings.path, replay_settings.ignore, replay_settings.normalizer)
                self._close_replay()
                self._replay, self._source = replay, source
                # The recording lives as long as the proxy: keep the cyclic GC from
                # walking it again and again while calls allocate (a freed object is
                # still freed by its reference count).
                gc.freeze()
                logger.info(
                    f"llm-traj: replaying {replay.sessions} sessions from {settings.path} (each read when first asked for)"
                )
        except (OSError, ReplayLoadError, exceptions.OptionsError) as exc:
            # A replay already loaded goes on as mitmproxy rolls the options back;
            # with none, LLM calls are refused, never forwarded.
            self._broken = self._replay is None
            raise exceptions.OptionsError(str(exc)) from None
        self._settings = replay_settings
        self._broken = False
        self._recorder.marked_path = replay_settings.record_path

    def serves_flows(self) -> bool:
        return self._replay is not None or self._broken

    @property
    def replay(self) -> Replay | None:
        """The recording being replayed (None outside replay mode)."""
        return self._replay

    @property
    def forwards_misses(self) -> bool:
        return self._settings is not None and self._settings.miss != "error"

    def request(self, flow: http.HTTPFlow) -> None:
        replay = self._replay
        if replay is None or flow.response is not None:
            if self._broken and flow.response is None and (call := llm_call(flow)) is not None:
                flow.response = error_response(503, "llm-traj replay is not configured; see the proxy's log",
                                               "server_error", "replay_not_configured", call.api)  # fmt: skip
            return
        call = llm_call(flow)
        if call is None:
            return
        request = flow.request
        settings = self._settings
        body = request.get_content(strict=False) or b""
        canonical = replay.canonical(call.api, body, text_headers(request.headers.fields))
        outcome = replay.match(call.session, canonical, settings.position, settings.nearest)
        info: CallMetadata = flow.metadata[CALL_KEY]
        if isinstance(outcome, Miss):
            info["replay"] = "miss"
            if settings.miss == "error":
                logger.warning(outcome.message)
                kind = "invalid_request_error" if outcome.status < 500 else "server_error"
                flow.response = error_response(outcome.status, outcome.message, kind, outcome.code, call.api)
            else:  # the flow goes on to the upstream
                info["record"] = settings.miss == "forward-record"
                logger.warning(f"{outcome.message}; forwarded upstream{' and recorded' if info['record'] else ''}")
            return
        reply, step = outcome.reply, outcome.step
        info["replay"], info["index"] = outcome.rung, step.index
        flow.is_replay = "response"
        # The header tells every call's rung; the log only the noteworthy ones
        # unless asked (termlog_verbosity=debug). mitmproxy's loggers pass every
        # level to its handlers, which filter late: even a debug line per call
        # costs ~4% of the requests/s, so exact matches are not logged at all.
        if outcome.rung != EXACT:
            how = outcome.rung + (f": {', '.join(outcome.rules)}" if outcome.rules else "")
            how += f", similarity {outcome.score:.3f}: {'; '.join(outcome.differences)}" if outcome.score is not None else ""
            logger.info(f"llm-traj: replayed {call.session} #{step.index} ({how})")
        elif self._log_exact:
            logger.debug(f"llm-traj: replayed {call.session} #{step.index} ({outcome.rung})")
        headers = reply.headers + _RUNG_HEADERS[outcome.rung]
        if reply.cut or (settings.speed > 0 and reply.events):
            speed = settings.speed

            async def produce() -> ProducedResponse:
                # latin-1 both ways keeps the header bytes as recorded
                return ProducedResponse(reply.status, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                                        reply_body(reply, speed))  # fmt: skip

            self._loopback.serve(flow, produce)
        else:
            flow.response = http.Response.make(reply.status, reply.body, headers)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Only loopback replies and forwarded misses get here (a response set in
        # `request` skips this hook): pass them on as they come, never buffered;
        # but a call being recorded is the recorder's to stream or read whole.
        info: CallMetadata | None = flow.metadata.get(CALL_KEY)
        if info is not None and "replay" in info and not info.get("record"):
            flow.response.stream = True

    def report(self) -> dict | None:
        """The replay report so far (JSON-able); None outside replay mode."""
        return self._replay.report() if self._replay is not None else None

    @command.command("llm_traj.replay.report")
    def report_command(self) -> str:
        """The replay report so far: per session, the calls served (by which
        rung), the misses and the first difference."""
        if self._replay is None:
            raise exceptions.CommandError("llm_traj.replay.report: the proxy is not replaying (llm_traj_mode=replay)")
        return "\n".join(self._replay.report_lines())

    def done(self) -> None:
        if self._replay is not None:
            for line in self._replay.report_lines():
                logger.info(f"llm-traj: {line}")
            self._replay.close()

    def _close_replay(self) -> None:
        if self._replay is not None:
            self._replay.close()


def _read_settings(path: Path) -> ReplaySettings:
    opts = ctx.options
    miss = opts.llm_traj_replay_miss.strip().lower()
    if miss not in MISS_POLICIES:
        raise exceptions.OptionsError(
            f"llm_traj_replay_miss={opts.llm_traj_replay_miss!r} is not a policy; use one of: {', '.join(MISS_POLICIES)}"
        )
    try:
        speed = float(opts.llm_traj_replay_speed)
    except ValueError:
        speed = math.nan
    if not (math.isfinite(speed) and speed >= 0):
        raise exceptions.OptionsError(
            f"llm_traj_replay_speed={opts.llm_traj_replay_speed!r} is not a number >= 0 "
            "(0: at once, 1: as recorded, 2: twice as fast)"
        )
    record_path = None
    if miss == "forward-record":
        if not opts.llm_traj_replay_record_path:
            raise exceptions.OptionsError(
                "llm_traj_replay_miss=forward-record needs --set llm_traj_replay_record_path=DIR (or FILE.jsonl) "
                "for the forwarded calls"
            )
        record_path = Path(opts.llm_traj_replay_record_path).expanduser()
        if record_path.resolve() == path.resolve():
            raise exceptions.OptionsError(
                "llm_traj_replay_record_path must differ from llm_traj_path, the recording being replayed"
            )
    elif opts.llm_traj_replay_record_path:
        raise exceptions.OptionsError("llm_traj_replay_record_path is only used with llm_traj_replay_miss=forward-record")
    ignore = frozenset(name.strip() for name in opts.llm_traj_replay_ignore.split(",") if name.strip())
    try:
        normalizer = load_rules(opts.llm_traj_replay_rules)
    except RuleError as exc:
        raise exceptions.OptionsError(f"llm_traj_replay_rules: {exc}") from None
    return ReplaySettings(miss, opts.llm_traj_replay_position, speed, ignore, record_path,
                          opts.llm_traj_replay_nearest, opts.llm_traj_replay_rules, normalizer)  # fmt: skip
