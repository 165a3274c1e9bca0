"""The `llm-traj` command."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

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
    from .demo import run_demo
    from .proxy_process import ProxyStartError

    path = out or Path(tempfile.mkdtemp(prefix="llm-traj-demo-"))
    try:
        text = run_demo(path)
    except ProxyStartError as exc:
        fail(str(exc))
    typer.echo(text)
    typer.echo(f"\ntrajectory: {path / 'demo.jsonl'}")


@app.command()
def show(path: Path = typer.Argument(..., help="A trajectory directory or .jsonl file.")) -> None:
    """Print a trajectory readably."""
    from .show import render
    from .store import TrajectoryError, read_records

    if not path.exists():
        fail(f"{path} does not exist")
    try:
        typer.echo(render(read_records(path)))
    except TrajectoryError as exc:
        fail(f"{exc} (fix or remove that line)")



MODE_HELP = "record, replay or anticall"
TRAJ_HELP = "Trajectory directory, or a FILE.jsonl."
SET_HELP = "Extra mitmproxy/llm-traj option as name=value (repeatable)."


def _summary(traj: Path, session: str, since: float, code: int, started: float) -> str:
    from .store import TrajectoryError, read_records

    try:
        records = [r for r in read_records(traj, tolerate_corrupt=True) if r.session == session and r.timings.started_at >= since]
    except (OSError, TrajectoryError):
        records = []
    failed = sum(1 for r in records if not r.complete or (r.status or 0) >= 400)
    usage = [r.response.get("usage") or {} for r in records if isinstance(r.response, dict)]
    prompt = sum(u.get("prompt_tokens") or 0 for u in usage)
    completion = sum(u.get("completion_tokens") or 0 for u in usage)
    return (
        f"llm-traj: agent exited {code}; session {session}: {len(records)} calls, {failed} failed, "
        f"{prompt}+{completion} tokens, {time.time() - started:.1f} s; trajectory: {traj}"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    mode: str = typer.Option("record", help=MODE_HELP),
    upstream: str = typer.Option(None, help="Model endpoint to forward to (base-url mode), e.g. https://api.openai.com"),
    traj: Path = typer.Option(Path("trajectories"), help=TRAJ_HELP),
    session: str = typer.Option("default", help="Session id of the agent's calls."),
    via: str = typer.Option("base-url", help="How the agent reaches the proxy: base-url or https-proxy."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Run an agent (after --) with its LLM calls going through the proxy; exit with the agent's code."""
    from .proxy_process import ProxyStartError
    from .runner import RunError, plan_run, run as run_plan

    try:
        plan = plan_run(mode=mode, traj=traj, session=session, via=via, upstream=upstream, command=ctx.args, sets=set_)
        run_dir = Path(tempfile.mkdtemp(prefix="llm-traj-run-"))
        code, started = run_plan(plan, run_dir)
    except (RunError, ProxyStartError) as exc:
        fail(str(exc), 2)
    typer.echo(_summary(traj, session, started, code, started), err=True)
    raise typer.Exit(code)


STATE_DIR_OPTION = typer.Option(None, "--state-dir", help="Where service state lives (default ~/.llm-traj).")


@app.command()
def start(
    mode: str = typer.Option("record", help=MODE_HELP),
    upstream: str = typer.Option(None, help="Reverse-proxy to this endpoint; without it, a regular (HTTPS_PROXY) proxy."),
    traj: Path = typer.Option(Path("trajectories"), help=TRAJ_HELP),
    port: int = typer.Option(8080, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    name: str = typer.Option("default", help="Service name, to run several."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    state_dir: Path = STATE_DIR_OPTION,
) -> None:
    """Start the proxy in the background."""
    from .proxy_process import ProxyProcess, ProxyStartError
    from .runner import RunError, check_upstream, parse_sets
    from .service import DEFAULT_STATE_DIR, start_service

    state_dir = state_dir or DEFAULT_STATE_DIR
    try:
        options = {"llm_traj_mode": mode, "llm_traj_path": traj.resolve(), **parse_sets(set_)}
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
    from .runner import RunError
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


if __name__ == "__main__":
    app()
