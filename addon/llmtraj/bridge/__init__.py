"""The bridge: agents that speak Anthropic Messages or OpenAI Responses run on
an upstream that speaks only chat completions (a vLLM or SGLang engine), with
their own API's answers streamed live and the engine's exact tokens recorded.

A route says which API its upstream speaks (`upstream_api` in
`llm_traj_config`); a call in another API is then translated:

    chat_request = to_chat(api.name, agent_request)     # Untranslatable -> 400 in the agent's shape
    call = BridgedCall(api, agent_request, chat_request, url)
    answer = await call.answer(status, headers, body)  # the agent's error, stream or final object
    call.note()                                         # the upstream side, for the record

Plain modules: mitmproxy is met only in `llmtraj.mitm.upstreaming`.
"""

from .call import UPSTREAM_API, AgentAnswer, BridgedCall, json_answer, to_chat
from .errors import Untranslatable

__all__ = ["UPSTREAM_API", "AgentAnswer", "BridgedCall", "Untranslatable", "json_answer", "to_chat"]
