"""`llm-traj prompts ...`: the prompt registry from the command line.

Every command takes `--prompts PATH`, the same registry the proxy's
`llm_traj_prompts` names, with the same default ($LLM_TRAJ_PROMPTS, else the
state directory); `--prompts mlflow:TRACKING_URI` reads MLflow's. Mistakes (unknown name, label or version, a template that
does not parse, a file that cannot be read) are one line and exit code 2."""

from __future__ import annotations

import datetime
import difflib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..prompts.registry import LATEST, PromptError, PromptRegistry, open_registry, parse_ref

app = typer.Typer(help="The prompt registry: versioned system prompts, labels, import/export.", no_args_is_help=True)

PromptsPath = Annotated[Optional[str], typer.Option(
    "--prompts", envvar="LLM_TRAJ_PROMPTS",
    help="The registry file (default ~/.llm-traj/prompts.sqlite; the proxy's llm_traj_prompts), or "
         "mlflow:TRACKING_URI for MLflow's prompt registry (read-only here).")]
META_SUFFIX = ".meta.json"


def fail(message: str, code: int) -> None:
    from .app import fail as fail_with_one_line  # app imports this module

    fail_with_one_line(message, code)


@contextmanager
def _registry(location: str | None, *, create: bool = False) -> Iterator[PromptRegistry]:
    """The registry, for a `with` block whose PromptError ends the command with one line."""
    from ..prompts.registry import default_registry_path

    try:
        with open_registry(location or default_registry_path(), create=create) as registry:
            yield registry
    except PromptError as exc:
        fail(str(exc), 2)


def _read_prompt(file: Path) -> tuple[str | None, list | None]:
    """(text, None) of a text file, or (None, messages) of a .json list of chat messages."""
    try:
        content = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"cannot read {file}: {exc}") from None
    if file.suffix == ".json":
        try:
            return None, json.loads(content)
        except ValueError as exc:
            raise PromptError(f"{file}: not JSON ({exc}); a chat prompt is a JSON list of messages") from None
    return content, None


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M")


def _table(*columns: str):
    from rich.table import Table  # rich only for the commands that draw tables

    return Table(*columns)


def _console():
    from rich.console import Console

    return Console(width=max(Console().width, 120))


@app.command()
def add(
    name: str = typer.Argument(..., help="The prompt's name."),
    file: Path = typer.Argument(..., help="Its text (placeholders as {{name}}), or a .json list of chat messages."),
    message: str = typer.Option("", "-m", "--message", help="What changed (the version's commit message)."),
    label: list[str] = typer.Option([], "--label", help="Point this label at the new version (repeatable)."),
    tag: list[str] = typer.Option([], "--tag", help="A tag of the version (repeatable)."),
    prompts: PromptsPath = None,
) -> None:
    """Add a version of a prompt (version 1 of a new one); the same content again adds nothing."""
    with _registry(prompts, create=True) as registry:
        text, messages = _read_prompt(file)
        version, created = registry.add(name, text, messages=messages, message=message, tags=tag, labels=label)
    said = "added" if created else "unchanged, still"
    typer.echo(f"{name}/{version.version} {said}; labels: {', '.join(version.labels)}")


@app.command("list")
def list_(prompts: PromptsPath = None) -> None:
    """Every prompt: its newest version, labels, variables."""
    with _registry(prompts) as registry:
        table = _table("name", "versions", "labels", "variables", "updated", "message")
        for name in registry.names():
            versions = registry.versions(name)
            newest = versions[-1]
            labels = ", ".join(f"{label}→{v}" for label, v in registry.labels(name).items())
            table.add_row(name, str(newest.version), labels, ", ".join(dict.fromkeys(newest.template.variables)),
                          _when(newest.created_at), newest.message)  # fmt: skip
    _console().print(table)


@app.command()
def show(
    ref: str = typer.Argument(..., help="NAME, NAME@LABEL or NAME/VERSION."),
    history: bool = typer.Option(False, "--history", help="List every version instead of the text."),
    prompts: PromptsPath = None,
) -> None:
    """A version's text and details (the one `latest` names by default), or the prompt's versions."""
    with _registry(prompts) as registry:
        version = registry.get(ref)
        versions = registry.versions(version.name) if history else []
    if history:
        table = _table("version", "labels", "created", "tags", "message")
        for v in versions:
            table.add_row(str(v.version), ", ".join(v.labels), _when(v.created_at), ", ".join(v.tags), v.message)
        _console().print(table)
        return
    console = _console()
    console.print(f"[bold]{version.name}/{version.version}[/bold]  labels: {', '.join(version.labels) or '-'}  "
                  f"created {_when(version.created_at)}", highlight=False)  # fmt: skip
    for title, value in (("message", version.message), ("tags", ", ".join(version.tags)),
                         ("variables", ", ".join(dict.fromkeys(version.template.variables)))):  # fmt: skip
        if value:
            console.print(f"{title}: {value}", highlight=False, markup=False)
    typer.echo("")
    typer.echo(json.dumps(version.messages, indent=2, ensure_ascii=False) if version.messages else version.text)


@app.command()
def label(
    name: str = typer.Argument(...),
    version: int = typer.Argument(..., help="The version the label points at from now on."),
    label: str = typer.Argument(..., help="e.g. production, staging."),
    prompts: PromptsPath = None,
) -> None:
    """Point a label at a version (moving it if it pointed elsewhere)."""
    with _registry(prompts) as registry:
        registry.set_label(name, version, label)
    typer.echo(f"{name}@{label} → {name}/{version}")


@app.command()
def diff(
    name: str = typer.Argument(...),
    a: str = typer.Argument(..., help="A version number or a label."),
    b: str = typer.Argument(..., help="A version number or a label."),
    prompts: PromptsPath = None,
) -> None:
    """A unified diff of two versions' texts."""
    with _registry(prompts) as registry:
        first, second = (registry.get(_ref(name, side)) for side in (a, b))
    lines = difflib.unified_diff(first.text.splitlines(), second.text.splitlines(),
                                 f"{name}/{first.version}", f"{name}/{second.version}", lineterm="")  # fmt: skip
    typer.echo("\n".join(lines) or f"{name}/{first.version} and {name}/{second.version} have the same text")


def _ref(name: str, side: str):
    return parse_ref(f"{name}/{side}" if side.isdigit() else f"{name}@{side}")


@app.command("export")
def export_(
    folder: Path = typer.Argument(..., help="Written: NAME/VERSION.txt (or .json) and NAME/VERSION.meta.json per version."),
    prompts: PromptsPath = None,
) -> None:
    """Write every version to a folder of files, to keep the prompts in git."""
    with _registry(prompts) as registry:
        versions = registry.all_versions()
        labels = {name: registry.labels(name) for name in registry.names()}
    try:
        for v in versions:
            target = folder / v.name
            target.mkdir(parents=True, exist_ok=True)
            body = json.dumps(v.messages, indent=2, ensure_ascii=False) + "\n" if v.messages else v.text
            (target / f"{v.version}{'.json' if v.messages else '.txt'}").write_text(body, encoding="utf-8")
            meta = {"message": v.message, "tags": list(v.tags), "created_at": v.created_at,
                    "labels": [lb for lb, n in labels[v.name].items() if n == v.version and lb != LATEST]}  # fmt: skip
            (target / f"{v.version}{META_SUFFIX}").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {folder}: {exc}", 2)
    typer.echo(f"exported {len(versions)} versions of {len(labels)} prompts to {folder}")


@app.command("import")
def import_(
    folder: Path = typer.Argument(..., help="A folder as `export` writes it: NAME/VERSION.txt|.json [+ .meta.json]."),
    prompts: PromptsPath = None,
) -> None:
    """Add the versions in a folder, keeping their numbers; a version the registry has already (same number,
    same content) is skipped, one with other content is refused. Labels follow."""
    if not folder.is_dir():
        fail(f"{folder} is not a folder of prompts (NAME/VERSION.txt)", 2)
    files = [f for f in folder.glob("*/*") if f.suffix in (".txt", ".json") and not f.name.endswith(META_SUFFIX)]
    if not files or any(not f.stem.isdigit() for f in files):
        odd = next((f for f in files if not f.stem.isdigit()), None)
        fail(f"{odd or folder}: expected files named NAME/VERSION.txt or NAME/VERSION.json", 2)
    added = 0
    with _registry(prompts, create=True) as registry:
        for file in sorted(files, key=lambda f: (f.parent.name, int(f.stem))):
            try:
                meta_file = file.with_name(file.stem + META_SUFFIX)
                meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
                text, messages = _read_prompt(file)
                added += registry.add_numbered(file.parent.name, int(file.stem), text, messages=messages,
                                               message=meta.get("message", ""), tags=meta.get("tags"),
                                               labels=meta.get("labels"), created_at=_created_at(meta))  # fmt: skip
            except (PromptError, ValueError) as exc:
                fail(f"{file}: {exc}", 2)
    typer.echo(f"imported {added} new versions from {len(files)} files in {folder}")


def _created_at(meta: dict) -> float | None:
    when = meta.get("created_at")
    if when is not None and (isinstance(when, bool) or not isinstance(when, (int, float))):
        raise PromptError(f"created_at {when!r} in its {META_SUFFIX} is not a Unix time in seconds")
    return when


@app.command("import-mlflow")
def import_mlflow(
    tracking_uri: str = typer.Argument(..., help="MLflow's tracking URI, e.g. sqlite:///mlflow.db or http://mlflow:5000."),
    names: list[str] = typer.Argument(None, help="Only these prompts (default: every one)."),
    prompts: PromptsPath = None,
) -> None:
    """Copy prompts from MLflow's prompt registry (llm-traj[mlflow]): versions keep their numbers, aliases become
    labels, so an override may say prompts:/NAME/VERSION or prompts:/NAME@ALIAS. Again: only what is new."""
    from ..prompts.from_mlflow import copy_from_mlflow

    with _registry(prompts, create=True) as registry:
        copied = copy_from_mlflow(registry, tracking_uri, names or None)
    table = _table("name", "versions", "new", "labels")
    for c in copied:
        table.add_row(c.name, str(c.versions), ", ".join(map(str, c.added)) or "-",
                      ", ".join(f"{label}→{v}" for label, v in sorted(c.labels.items())))  # fmt: skip
    _console().print(table)
