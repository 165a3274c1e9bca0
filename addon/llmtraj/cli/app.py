"""The `llm-traj` command."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Record, replay and take over the LLM calls of any agent (a mitmproxy addon).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 1) -> None:
    """One line for people, never a traceback."""
    typer.echo(f"llm-traj: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def demo(
    out: Path = typer.Option(None, help="Directory for the trajectory (default: a new temporary one)."),
) -> None:
    """Record a scripted agent against a bundled stand-in model server and print the trajectory."""
    import httpx

    from .demo import run_demo
    from .proxy_process import ProxyStartError

    path = out or Path(tempfile.mkdtemp(prefix="llm-traj-demo-"))
    try:
        text = run_demo(path)
    except ProxyStartError as exc:
        fail(str(exc))
    except httpx.HTTPError as exc:
        fail(f"the demo agent's call through the proxy failed: {exc}")
    typer.echo(text)
    typer.echo(f"\ntrajectory: {path / 'demo.jsonl'}")


@app.command()
def show(
    path: str = typer.Argument(..., help="A trajectory directory or .jsonl file, or a URL (s3://bucket/prefix)."),
    session: str = typer.Option(None, help="Only this session (default: all)."),
) -> None:
    """Print a trajectory readably: turns, tool calls, token usage, timings, errors."""
    from ..inspect.show import render

    reader = _reader(path)
    if session is not None and session not in reader.sessions:
        fail(f"no calls of session {session!r} in {path}", 2)
    with _reading():
        for name in [session] if session is not None else reader.sessions:
            typer.echo(render(reader.sessions[name]))


MODE_HELP = "record, replay or anticall"
TRAJ_HELP = "Trajectory directory, or a FILE.jsonl."
READ_HELP = "Trajectory directory, a FILE.jsonl, or an fsspec URL (s3://bucket/prefix)."
SET_HELP = "Extra mitmproxy/llm-traj option as name=value (repeatable)."
# Options the proxy-starting commands (run, start, web) share.
MODE_OPTION = typer.Option("record", help=MODE_HELP)
TRAJ_OPTION = typer.Option(Path("trajectories"), help=TRAJ_HELP)
SET_OPTION = typer.Option([], "--set", help=SET_HELP)
CONFIG_OPTION = typer.Option(
    None, "--config", help="Upstream config (.toml/.yaml): routes by model, keys to inject, retries (llm_traj_config)."
)
SERVICE_UPSTREAM_OPTION = typer.Option(
    None, help="Reverse-proxy to this endpoint; without it, a regular (HTTPS_PROXY) proxy."
)


def _summary(traj: Path, session: str, since: float, code: int, started: float) -> str:
    from ..core.store import TrajectoryError, TrajectoryReader
    from ..inspect.stats import usage_of

    try:
        calls = TrajectoryReader(traj, tolerate_corrupt=True).sessions.get(session, [])  # only that session is read
        records = [r for r in calls if r.timings.started_at >= since]
    except (OSError, TrajectoryError):
        records = []
    failed = sum(1 for r in records if not r.complete or (r.status or 0) >= 400)
    usage = [usage_of(r) or {} for r in records]
    prompt = sum(u.get("prompt_tokens") or 0 for u in usage)
    completion = sum(u.get("completion_tokens") or 0 for u in usage)
    return (
        f"llm-traj: agent exited {code}; session {session}: {len(records)} calls, {failed} failed, "
        f"{prompt}+{completion} tokens, {time.time() - started:.1f} s; trajectory: {traj}"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    mode: str = MODE_OPTION,
    upstream: str = typer.Option(None, help="Model endpoint to forward to (base-url mode), e.g. https://api.openai.com"),
    traj: Path = TRAJ_OPTION,
    session: str = typer.Option("default", help="Session id of the agent's calls."),
    via: str = typer.Option("base-url", help="How the agent reaches the proxy: base-url or https-proxy."),
    config: Path = CONFIG_OPTION,
    prompt: str = typer.Option(None, "--prompt", help="Send the agent's calls with this registered system prompt: "
                               "NAME@LABEL, NAME/VERSION or an A/B split REF=W,REF=W (llm_traj_prompt_override)."),
    prompts: str = typer.Option(None, "--prompts", envvar="LLM_TRAJ_PROMPTS",
                                help="The prompt registry calls are tagged from (llm_traj_prompts): a file, or "
                                     "mlflow:TRACKING_URI."),
    proxy_log: Path = typer.Option(None, "--proxy-log", help="Keep the proxy's log in this file (appended to, "
                                   "mode 0600; with --set flow_detail=4 it holds every request in full)."),
    set_: list[str] = SET_OPTION,
) -> None:
    """Run an agent (after --) with its LLM calls going through the proxy; exit with the agent's code."""
    from .proxy_process import ProxyStartError
    from .run import RunError, plan_run
    from .run import run as run_plan

    run_dir = Path(tempfile.mkdtemp(prefix="llm-traj-run-"))  # the proxy's log (unless --proxy-log) and CA: gone with the run
    try:
        plan = plan_run(mode=mode, traj=traj, session=session, via=via, upstream=upstream, command=ctx.args,
                        sets=[*set_, *_config_set(config), *_prompt_sets(prompt, prompts)], proxy_log=proxy_log)
        report: dict = {}
        on_exit = (_end_anticall_session(plan) if plan.mode == "anticall"
                   else _keep_replay_report(plan, report) if plan.mode == "replay" else None)  # fmt: skip
        code, started = run_plan(plan, run_dir, on_exit)
    except (RunError, ProxyStartError) as exc:
        fail(str(exc), 2)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    typer.echo(_summary(traj, session, started, code, started), err=True)
    if plan.mode == "replay":
        code = _print_replay_report(report, code)
    raise typer.Exit(code)


def _keep_replay_report(plan, report: dict):
    """Replay: the proxy's report, asked for before it stops."""
    from .run import replay_report

    def on_agent_exit(proxy) -> None:
        report.update(replay_report(plan, proxy) or {})

    return on_agent_exit


def _print_replay_report(report: dict, code: int) -> int:
    """Prints the replay report; the exit code is 1 when the agent succeeded
    but a call missed (the agent's own code otherwise)."""
    from ..replay.report import report_lines

    sessions = report.get("sessions")
    if sessions is None:
        typer.echo("llm-traj: the replay report could not be had from the proxy", err=True)
        return code or 1
    calls = sum(s["recorded"] for s in sessions.values())
    for line in report_lines(sessions, calls, skipped=report.get("skipped_lines")):
        typer.echo(f"llm-traj: {line}", err=True)
    missed = sum(s["misses"] for s in sessions.values())
    return 1 if missed and code == 0 else code


def _end_anticall_session(plan):
    """Anti-call: the agent has exited, so its drivers get SESSION_END at once."""
    from ..anticall.client import AntiCallError
    from ..anticall.driver import end_session

    def on_agent_exit(proxy) -> None:
        try:
            end_session(plan.traj, plan.session, "the agent exited")
        except AntiCallError as exc:
            typer.echo(f"llm-traj: could not end session {plan.session}: {exc.message}", err=True)

    return on_agent_exit


STATE_DIR_OPTION = typer.Option(None, "--state-dir", help="Where service state lives (default ~/.llm-traj).")


def _prompt_sets(prompt: str | None, prompts: str | None) -> list[str]:
    from ..prompts.registry import MLFLOW_SCHEME

    if prompts is not None and not prompts.startswith(MLFLOW_SCHEME):
        prompts = str(Path(prompts).expanduser().resolve())  # the proxy runs elsewhere
    return ([f"llm_traj_prompt_override={prompt}"] if prompt else []) + \
        ([f"llm_traj_prompts={prompts}"] if prompts is not None else [])  # fmt: skip


def _config_set(config: Path | None) -> list[str]:
    return [f"llm_traj_config={config.resolve()}"] if config is not None else []


@app.command()
def start(
    mode: str = MODE_OPTION,
    upstream: str = SERVICE_UPSTREAM_OPTION,
    traj: Path = TRAJ_OPTION,
    config: Path = CONFIG_OPTION,
    port: int = typer.Option(8080, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    name: str = typer.Option("default", help="Service name, to run several."),
    set_: list[str] = SET_OPTION,
    state_dir: Path = STATE_DIR_OPTION,
) -> None:
    """Start the proxy in the background."""
    from .proxy_process import ProxyProcess, ProxyStartError
    from .run import COMMAND_DEFAULTS, RunError, check_upstream, parse_sets
    from .service import DEFAULT_STATE_DIR, start_service

    state_dir = state_dir or DEFAULT_STATE_DIR
    try:
        options = {**COMMAND_DEFAULTS, "llm_traj_mode": mode, "llm_traj_path": traj.resolve(), **parse_sets([*set_, *_config_set(config)])}
        proxy = ProxyProcess(
            upstream=check_upstream(upstream) if upstream else None,
            options=options, listen_host=host, port=port, log=state_dir / f"{name}.log",
        )
        state = start_service(state_dir, name, proxy, mode, traj.resolve())
    except (RunError, ProxyStartError) as exc:
        fail(str(exc), 2)
    typer.echo(f"llm-traj: {name} running, pid {state.pid}, {state.url}, mode {mode}, log {state.log}")


@app.command()
def stop(name: str = typer.Option("default", help="Service name."), state_dir: Path = STATE_DIR_OPTION) -> None:
    """Stop a background proxy."""
    from .run import RunError
    from .service import DEFAULT_STATE_DIR, stop_service

    try:
        state = stop_service(state_dir or DEFAULT_STATE_DIR, name)
    except RunError as exc:
        fail(str(exc))
    typer.echo(f"llm-traj: {name} stopped (pid {state.pid})")


@app.command()
def status(name: str = typer.Option("default", help="Service name."), state_dir: Path = STATE_DIR_OPTION) -> None:
    """Is the background proxy up? Exit 0 if healthy, 3 if not."""
    from .service import DEFAULT_STATE_DIR, healthy, read_state

    state = read_state(state_dir or DEFAULT_STATE_DIR, name)
    if state is None:
        fail(f"{name}: not running", 3)
    if not healthy(state):
        fail(f"{name}: pid {state.pid} at {state.url} is not answering; see {state.log}", 3)
    typer.echo(f"llm-traj: {name} healthy, pid {state.pid}, {state.url}, mode {state.mode}, trajectory {state.traj}")


# Where the driver-side commands find the proxy's control API.
ControlFile = Annotated[Optional[Path], typer.Option(
    "--control-file", envvar="LLM_TRAJ_CONTROL_FILE", help="The proxy's control file (<llm_traj_path>/control.json).")]
ControlUrl = Annotated[Optional[str], typer.Option(
    "--control", envvar="LLM_TRAJ_CONTROL", help="The control API's URL (instead of --control-file).")]
Token = Annotated[Optional[str], typer.Option("--token", envvar="LLM_TRAJ_TOKEN", help="The control API's token.")]


def _drive(control_file: Path | None, control: str | None, token: str | None, work):
    """Run `work(client)` against the proxy's control API; errors end the command with one line."""
    from ..anticall.client import AntiCallError
    from ..anticall.driver import UsageError, connect, using

    try:
        return asyncio.run(using(connect(control_file, control, token), work))
    except UsageError as exc:
        fail(str(exc), 2)
    except AntiCallError as exc:
        fail(exc.message)


@app.command("anti-call")
def anti_call(
    index: int = typer.Option(..., "--index", help="0: wait for the first call; N: answer call N (calls count from 1)."),
    response: Optional[str] = typer.Option(None, "--response", help="The answer: a chat.completion JSON object, or a JSON string (text)."),
    response_file: Optional[Path] = typer.Option(None, "--response-file", help="Read the answer from this file (large payloads)."),
    session: str = typer.Option("default", "--session", help="The agent's session."),
    timeout: float = typer.Option(0.0, "--timeout", help="Give up after this many seconds (0: wait as long as it takes)."),
    control_file: ControlFile = None,
    control: ControlUrl = None,
    token: Token = None,
) -> None:
    """ROCK's anti-call-llm: answer call N, wait for call N+1 and print its request (one JSON line) or SESSION_END."""
    from ..anticall.driver import UsageError, parse_response
    from ..anticall.driver import anti_call as step

    if response is not None and response_file is not None:
        fail("give --response or --response-file, not both", 2)
    try:
        text = response_file.read_text() if response_file is not None else response
        answer = None if text is None else parse_response(text)
    except OSError as exc:
        fail(f"cannot read --response-file: {exc}", 2)
    except UsageError as exc:
        fail(str(exc), 2)
    warn = lambda line: typer.echo(line, err=True)  # noqa: E731
    typer.echo(_drive(control_file, control, token, lambda client: step(client, session, index, answer, timeout, warn)))


@app.command("watch-agent")
def watch_agent(
    pid: int = typer.Option(..., "--pid", help="The agent's process id."),
    session: str = typer.Option("default", "--session", help="The agent's session."),
    control_file: ControlFile = None,
    control: ControlUrl = None,
    token: Token = None,
) -> None:
    """End the agent's session the moment its process exits: drivers get SESSION_END, its later calls an error."""
    from ..anticall.driver import watch_agent as watch

    info = _drive(control_file, control, token, lambda client: watch(client, pid, session))
    typer.echo(f"llm-traj: session {info.id} ended: {info.end_reason}")



# Lines the reading commands skipped (a bad line: with the rest of its session in its file), warned about by `_reading`.
_skipped_lines: list = []
_warned: set = set()  # (file, line) of those warned about: a single file's scan and the reading of its session both list one


def _reader(path: str):
    """A trajectory (a path, or an fsspec URL such as s3://bucket/prefix) to
    read one session at a time, or a one-line exit. A bad line is skipped
    with the rest of its session in its file, and warned about."""
    from ..core.remote import RemoteError, local_trajectory
    from ..core.store import TrajectoryReader, trajectory_files

    try:
        local = local_trajectory(path)
    except RemoteError as exc:
        fail(str(exc), 2)
    if not local.exists() and not trajectory_files(local):  # (FILE.jsonl compressed since: FILE.jsonl.zst is read)
        fail(f"{path} does not exist", 2)
    with _reading():
        return TrajectoryReader(local, tolerate_corrupt=True, skipped=_skipped_lines)


@contextlib.contextmanager
def _reading():
    """A line skipped while reading is a one-line warning; a bad line where
    none is tolerated (compact) a one-line exit."""
    from ..core.store import TrajectoryError

    try:
        yield
    except TrajectoryError as exc:
        fail(f"{exc} (fix or remove that line)", 2)
    finally:
        for line in _skipped_lines:
            if (line.file, line.line) not in _warned:
                _warned.add((line.file, line.line))
                typer.echo(f"llm-traj: warning: {line}", err=True)
        _skipped_lines.clear()


@app.command()
def cat(
    path: str = typer.Argument(..., help=READ_HELP),
    session: str = typer.Option(None, help="Only this session (default: all)."),
) -> None:
    """Print the trajectory as schema_version 1 lines, every request whole (for jq and other tools)."""
    reader = _reader(path)
    if session is not None and session not in reader.sessions:
        fail(f"no calls of session {session!r} in {path}", 2)
    out = sys.stdout.buffer
    with _reading():
        for name in [session] if session is not None else reader.sessions:
            for record in reader.sessions[name]:
                record.schema_version = 1
                out.write(record.model_dump_json().encode() + b"\n")
    out.flush()


@app.command()
def compact(
    path: Path = typer.Argument(..., help=TRAJ_HELP),
    zstd: bool = typer.Option(False, "--zstd", help="Also compress each file with zstd (FILE.jsonl.zst, replacing "
                              "FILE.jsonl); every command and replay read it as they read the plain file."),
) -> None:
    """Rewrite a trajectory in the current format (version 1 files become version 2), file by file.
    Stop recording to it first."""
    from ..core.store import CompactionError, compact_file, trajectory_files
    from ..recording.builder import mark_templates

    files = trajectory_files(path)
    if not files and not path.exists():
        fail(f"{path} does not exist", 2)
    before = after = 0
    for file in files:
        with _reading():
            try:
                _, old, new, skipped = compact_file(file, compress=zstd, mark_templates=mark_templates)
            except CompactionError as exc:
                fail(str(exc))
        before, after = before + old, after + new
        for line in skipped:
            typer.echo(f"llm-traj: {line}", err=True)
    typer.echo(f"llm-traj: compacted {path}: {before} bytes -> {after} bytes")


@app.command()
def stats(
    path: str = typer.Argument(..., help=READ_HELP),
    as_json: bool = typer.Option(False, "--json"),
    by: str = typer.Option("session,model", "--by", help="Group by session, model and/or prompt (its version), comma-separated."),
) -> None:
    """Totals per session and model (or prompt version): calls, failures, tokens, time."""
    import dataclasses
    import json

    from ..inspect.stats import GROUPINGS, render_stats
    from ..inspect.stats import stats as compute

    groupings = [g.strip() for g in by.split(",") if g.strip()]
    if not groupings or any(g not in GROUPINGS for g in groupings):
        fail(f"--by {by!r}: use one or more of {', '.join(GROUPINGS)}, comma-separated", 2)
    with _reading():
        rows = compute(_reader(path), by=groupings)
    typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) if as_json else render_stats(rows))


RULES_OPTION = typer.Option(None, "--rules", help="Normalisation rules file (.toml/.yaml), as llm_traj_replay_rules.")


def _normalizer(rules: Path | None):
    from ..replay.normalize import RuleError, load_rules

    try:
        return load_rules(rules)
    except RuleError as exc:
        fail(str(exc), 2)


@app.command("replay-rules")
def replay_rules(rules: Path = RULES_OPTION) -> None:
    """List the normalisation presets replay picks per agent, how each is recognised, and their rules."""
    typer.echo("\n".join(_normalizer(rules).describe()))


@app.command()
def diff(
    a: str = typer.Argument(..., help="First trajectory (a path or a URL)."),
    b: str = typer.Argument(..., help="Second trajectory (a path or a URL)."),
    ignore: str = typer.Option(None, help="Comma-separated request fields to ignore (default: replay's)."),
    raw: bool = typer.Option(False, "--raw", help="Compare requests as recorded, not normalised as replay matches them."),
    rules: Path = RULES_OPTION,
) -> None:
    """Where two trajectories of the same task diverge (requests normalised as replay matches them). Exit 1 if they
    do, 2 if one cannot be read."""
    from ..inspect.diff import diff as compute
    from ..inspect.diff import render_diff
    from ..replay.matching import DEFAULT_IGNORE

    fields = [f.strip() for f in ignore.split(",") if f.strip()] if ignore is not None else DEFAULT_IGNORE
    with _reading():
        result = compute(_reader(a), _reader(b), ignore=fields, normalizer=None if raw else _normalizer(rules))
    typer.echo(render_diff(result))
    raise typer.Exit(0 if result.identical else 1)


@app.command()
def export(
    path: str = typer.Argument(..., help=READ_HELP),
    fmt: str = typer.Option(..., "--format", help="openai-chat, har, atif or tokens (RL trainers: .jsonl, or .parquet with -o)."),
    granularity: str = typer.Option("per_call", help="openai-chat, tokens: per_call or per_session."),
    agent_name: str = typer.Option(None, help="atif: the agent's name (default: recognised from its calls)."),
    agent_version: str = typer.Option(None, help="atif: the agent's version (default: from its user-agent)."),
    out: Path = typer.Option(None, "-o", "--out", help="Output file (default: stdout)."),
) -> None:
    """Turn a trajectory into training or HTTP-tooling data."""
    from ..inspect.export import export as convert
    from ..inspect.export.common import FORMATS, GRANULARITIES

    if fmt not in FORMATS:
        fail(f"--format {fmt!r}: use one of {', '.join(FORMATS)}", 2)
    if granularity not in GRANULARITIES:
        fail(f"--granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}", 2)
    skipped: list = []
    if fmt == "tokens" and out is not None and out.suffix == ".parquet":
        from ..inspect.export.tokens import token_rows, write_parquet

        try:
            with _reading():
                write_parquet(token_rows(_reader(path), granularity, skipped), out)
        except ImportError as exc:
            fail(str(exc), 2)
    else:
        from ..core.store import private_opener

        # Written as it is made (a session at a time), to a file only renamed to `out` once whole.
        partial = None if out is None else out.with_name(out.name + ".partial")
        with _reading(), (contextlib.nullcontext(sys.stdout) if partial is None else open(partial, "w", opener=private_opener)) as sink:
            result = convert(_reader(path), fmt, granularity=granularity, agent_name=agent_name,
                             agent_version=agent_version, skipped=skipped)
            for text in [result] if isinstance(result, str) else (line + "\n" for line in result):
                sink.write(text)
        if partial is not None:
            partial.replace(out)
    if skipped:
        shown = "; ".join(str(s) for s in skipped[:5])
        more = f" (+{len(skipped) - 5} more)" if len(skipped) > 5 else ""
        typer.echo(f"llm-traj: skipped {len(skipped)} calls: {shown}{more}", err=True)



@app.command()
def web(
    mode: str = MODE_OPTION,
    upstream: str = SERVICE_UPSTREAM_OPTION,
    traj: Path = TRAJ_OPTION,
    config: Path = CONFIG_OPTION,
    port: int = typer.Option(8080, help="Proxy port."),
    web_port: int = typer.Option(8081, help="Web UI port."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (proxy and UI)."),
    set_: list[str] = SET_OPTION,
) -> None:
    """The proxy under mitmweb: LLM flows annotated, streams shown as the aggregated message. Ctrl-C stops it."""
    import signal

    from .proxy_process import ProxyProcess, ProxyStartError
    from .run import COMMAND_DEFAULTS, RunError, check_upstream, parse_sets
    from .service import port_free

    try:
        for p in (port, web_port):
            if not port_free(host, p):
                raise RunError(f"port {p} on {host} is busy; choose another with --port / --web-port")
        options = {**COMMAND_DEFAULTS, "llm_traj_mode": mode, "llm_traj_path": traj.resolve(), "web_port": web_port,
                   "web_host": host, **parse_sets([*set_, *_config_set(config)])}
        proxy = ProxyProcess(program="mitmweb", upstream=check_upstream(upstream) if upstream else None,
                             options=options, listen_host=host, port=port)
        proxy.start()
        web_url = proxy.web_url()
    except (RunError, ProxyStartError) as exc:
        fail(str(exc), 2)
    typer.echo(f"llm-traj: proxy {proxy.url}, web UI {web_url} (Ctrl-C stops)", err=True)
    signal.signal(signal.SIGTERM, lambda *_: proxy.stop())
    try:
        proxy.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()


def _add_subcommands() -> None:
    from .prompts import app as prompts_app

    app.add_typer(prompts_app, name="prompts")


_add_subcommands()

if __name__ == "__main__":
    app()
