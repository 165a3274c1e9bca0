"""MLflow's prompt registry as a source (the optional extra `llm-traj[mlflow]`):
its prompts copied into ours with their version numbers, commit messages, tags
and aliases (as labels), so calls are tagged with MLflow's versions and an
override can name them as MLflow does (`prompts:/NAME/VERSION`,
`prompts:/NAME@ALIAS`). Copying again adds only the versions that are new and
moves the labels as the aliases moved. Works with any MLflow tracking URI; a
local one (`sqlite:///mlflow.db`) needs no server."""

from __future__ import annotations

from dataclasses import dataclass

from .registry import LATEST, PromptError, PromptRegistry


@dataclass(frozen=True)
class Copied:
    name: str
    added: list[int]  # version numbers new to our registry
    versions: int
    labels: dict[str, int]


def _client(tracking_uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise PromptError("MLflow is not installed; pip install 'llm-traj[mlflow]'") from None
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _all(search, *args):
    """Every item of a paged MLflow search."""
    token = None
    while True:
        page = search(*args, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def copy_from_mlflow(registry: PromptRegistry, tracking_uri: str, names: list[str] | None = None) -> list[Copied]:
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        names = names or sorted(p.name for p in _all(client.search_prompts, None))
        return [_copy_prompt(registry, client, name) for name in names]
    except MlflowException as exc:
        raise PromptError(f"MLflow at {tracking_uri}: {exc.message.splitlines()[0]}") from None


def _copy_prompt(registry: PromptRegistry, client, name: str) -> Copied:
    versions = sorted(_all(client.search_prompt_versions, name), key=lambda v: int(v.version))
    if not versions:
        raise PromptError(f"MLflow has no prompt named {name!r}")
    added, labels = [], {}
    for mlflow_version in versions:
        number = int(mlflow_version.version)
        template = mlflow_version.template
        text, messages = (template, None) if isinstance(template, str) else (None, template)
        aliases = [a for a in client.get_prompt_version(name, number).aliases or () if a != LATEST]
        tags = [f"{k}={v}" for k, v in (mlflow_version.tags or {}).items() if not k.startswith(("mlflow.", "_"))]
        if registry.add_numbered(name, number, text, messages=messages, message=mlflow_version.commit_message or "",
                                 tags=tags, labels=aliases):  # fmt: skip
            added.append(number)
        labels.update(dict.fromkeys(aliases, number))
    return Copied(name, added, len(versions), labels)
