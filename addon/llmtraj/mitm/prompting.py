"""Prompt registry at the proxy: names the registry the record writer tags calls
from (`llm_traj_prompts`), and overrides a session's system prompt with a
registered version (`llm_traj_prompt_override`, or per session through
`PUT /llm-traj/prompt`, with the proxy's control token: an agent must not pick
its own prompt), fixed for the session from its first call, in every mode. Matching and rewriting are `llmtraj.prompts`'; only the request body of a
session with an override is touched (its first call looks up the registry)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from ..apis import API_BY_NAME
from ..core.session import InvalidSession, validate_session
from ..prompts.matching import APIS_WITH_SYSTEM_PROMPT, PromptIndex
from ..prompts.override import Assignment, Override, check_assignment, parse_assignment, rewrite_request
from ..prompts.registry import MLFLOW_SCHEME, PromptError, PromptRegistry, default_registry_path, open_registry, registry_exists
from .access import ControlAccess
from .recording import Recorder
from .routing import CALL_KEY, error_response

logger = logging.getLogger("llm_traj")

PROMPT_PATH = "/llm-traj/prompt"
REGISTRY_ENV = "LLM_TRAJ_PROMPTS"


def chosen_registry(option: str) -> str:
    """llm_traj_prompts, else $LLM_TRAJ_PROMPTS, else prompts.sqlite in the state directory (as the CLI's):
    a file, or mlflow:TRACKING_URI."""
    chosen = (option or os.environ.get(REGISTRY_ENV) or "").strip()
    if chosen.startswith(MLFLOW_SCHEME):
        return chosen
    return str(Path(chosen).expanduser() if chosen else default_registry_path())


def _json(status: int, obj: object) -> http.Response:
    return http.Response.make(status, json.dumps(obj), {"content-type": "application/json"})


class Prompting:
    def __init__(self, recorder: Recorder, access: ControlAccess) -> None:
        self._access = access
        self._registry: PromptRegistry | None = None
        self._index: PromptIndex | None = None
        self._index_version: int | None = None
        self._assignment: Assignment | None = None  # llm_traj_prompt_override
        self._requested: dict[str, Assignment] = {}  # per session, through PUT /llm-traj/prompt
        self._sessions: dict[str, Override | None] = {}  # fixed at a session's first call
        self._serving = False
        recorder.prompts_path = self.registry_path

    def load(self, loader) -> None:
        loader.add_option(
            "llm_traj_prompts", str, "",
            f"The prompt registry (SQLite) calls are tagged from and overrides come from "
            f"(default: ${REGISTRY_ENV}, else ~/.llm-traj/{default_registry_path().name}); "
            f"mlflow:TRACKING_URI reads MLflow's prompt registry live (llm-traj[mlflow]).",
        )
        loader.add_option(
            "llm_traj_prompt_override", str, "",
            "Replace every session's system prompt with a registered version: NAME@LABEL or NAME/VERSION, "
            "or an A/B split by session id, REF=WEIGHT,REF=WEIGHT (none=WEIGHT keeps the agent's prompt).",
        )

    def configure(self, updated: set[str]) -> None:
        if not {"llm_traj_prompts", "llm_traj_prompt_override"} & updated:
            return
        path = chosen_registry(ctx.options.llm_traj_prompts)
        override = ctx.options.llm_traj_prompt_override.strip()
        try:
            assignment = parse_assignment(override) if override else None
            registry = None
            if assignment is not None or ctx.options.llm_traj_prompts or registry_exists(path):
                registry = open_registry(path, create=assignment is None)
                if assignment is not None:
                    check_assignment(assignment, registry)
        except PromptError as exc:
            name = "llm_traj_prompt_override" if override and "registry" not in str(exc) else "llm_traj_prompts"
            raise exceptions.OptionsError(f"{name}: {exc}") from None
        if self._registry is not None:
            self._registry.close()
        self._registry, self._assignment = registry, assignment
        self._index = self._index_version = None
        self._sessions.clear()
        self._serving = registry is not None
        if assignment is not None:
            logger.info(f"llm-traj: prompt override {assignment} from {path}")

    @staticmethod
    def registry_path() -> str:
        """Where the record writer finds the registry to tag calls from (once it exists)."""
        return chosen_registry(ctx.options.llm_traj_prompts)

    def serves_flows(self) -> bool:
        return self._serving

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        info = flow.metadata.get(CALL_KEY)
        if info is None or flow.response is not None or info["api"] not in APIS_WITH_SYSTEM_PROMPT:
            return
        session = info["session"]
        if session not in self._sessions:
            try:
                self._sessions[session] = self._choose(session)
            except (PromptError, sqlite3.Error) as exc:
                flow.response = error_response(503, f"llm-traj prompt override for session {session}: {exc}",
                                               "server_error", "prompt_override_unavailable", API_BY_NAME[info["api"]])  # fmt: skip
                return
        override = self._sessions[session]
        if override is not None:
            info["prompt"] = {"override": override.ref}  # the recorder then reads the body whole

    def _choose(self, session: str) -> Override | None:
        assignment = self._requested.get(session, self._assignment)
        if assignment is None:
            return None
        arm = assignment.arm_for(session)
        if arm.ref is None:
            return None
        return Override(str(arm.ref) if len(assignment.arms) == 1 else f"{arm.ref} (A/B {assignment})",
                        self._registry.get(arm.ref))  # fmt: skip

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        info = flow.metadata.get(CALL_KEY)
        if info is None:
            if flow.request.path.split("?", 1)[0] == PROMPT_PATH:
                flow.response = self._control(flow)
            return
        override = self._sessions.get(info["session"]) if "prompt" in info else None
        if override is None:
            return
        request = flow.request
        rewritten = rewrite_request(info["api"], request.get_content(strict=False) or b"", override, self._current_index())
        if rewritten is None:
            return  # not a JSON object: the upstream answers it as it is
        body, original_hash = rewritten
        request.set_content(body)
        if original_hash is not None:
            info["prompt"]["original_hash"] = original_hash

    def _current_index(self) -> PromptIndex | None:
        """The index of the registry, rebuilt when it changed (to fill a template
        from the agent's own prompt)."""
        try:
            version = self._registry.data_version()
            if version != self._index_version:
                self._index, self._index_version = PromptIndex(self._registry.all_versions()), version
        except (sqlite3.Error, PromptError) as exc:
            logger.warning(f"llm-traj: prompt registry: {exc}")
        return self._index

    def _control(self, flow: http.HTTPFlow) -> http.Response:
        """GET ?session=S: the session's override; PUT {"session", "prompt"} (with
        the control token): set it before the session's first call (`null` for none)."""
        request = flow.request
        if self._registry is None:
            return _json(409, {"error": "no prompt registry; start the proxy with --set llm_traj_prompts=PATH"})
        if request.method == "GET":
            session = request.query.get("session", "")
            override = self._sessions.get(session)
            chosen = self._requested.get(session, self._assignment)
            return _json(200, {
                "session": session, "fixed": session in self._sessions, "assignment": str(chosen) if chosen else None,
                "override": None if override is None else {"ref": override.ref, "name": override.version.name,
                                                           "version": override.version.version},
            })  # fmt: skip
        if request.method != "PUT":
            return _json(405, {"error": f"{request.method} {PROMPT_PATH}: use GET or PUT"})
        if not self._access.check(flow):
            return flow.response
        try:
            asked = json.loads(request.get_content(strict=False) or b"")
            session = validate_session(str(asked["session"]))
            assignment = parse_assignment(str(asked["prompt"])) if asked.get("prompt") is not None else None
            if assignment is not None:
                check_assignment(assignment, self._registry)
        except (ValueError, KeyError, TypeError, InvalidSession, PromptError) as exc:
            message = str(exc) if isinstance(exc, (InvalidSession, PromptError)) else f"expected JSON {{\"session\": ID, \"prompt\": REF}} ({exc})"
            return _json(400, {"error": message})
        if session in self._sessions and str(self._requested.get(session, self._assignment)) != str(assignment):
            return _json(409, {"error": f"session {session} has made calls already; its prompt is fixed for the session"})
        if assignment is None:
            self._requested.pop(session, None)
        else:
            self._requested[session] = assignment
        return _json(200, {"session": session, "assignment": None if assignment is None else str(assignment)})
