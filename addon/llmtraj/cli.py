"""The `llm-traj` command."""

from __future__ import annotations

import tempfile
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


if __name__ == "__main__":
    app()
