"""The scripted policy (policy.py) as a chat-completions server: the upstream a
bridged agent runs on (the bridge translates the agent's Messages or Responses
calls to chat completions). It answers the way an engine does: a stream of
chunks, the tool call's arguments in several fragments, usage in the last
chunk; or a chat.completion body. Every request is logged as a JSON line.

    with ChatPolicy(log) as policy: ... policy.url ...
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .policy import OUT_FILE, decide

USAGE = {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108}


def _chunks(answer: dict[str, Any], model: str) -> list[dict[str, Any]]:
    top = {"id": "chatcmpl-policy", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    text = answer.get("text")
    if text:
        deltas += [{"content": text[i : i + 8]} for i in range(0, len(text), 8)]
    for index, call in enumerate(answer.get("tool_calls") or []):
        arguments = json.dumps(call["function"]["arguments"])
        start = {"index": index, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
        deltas.append({"tool_calls": [start]})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": arguments[i : i + 16]}}]}
                   for i in range(0, len(arguments), 16)]  # fmt: skip
    chunks = [{**top, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**top, "choices": [{"index": 0, "delta": {}, "finish_reason": answer.get("finish_reason", "stop")}]})
    chunks.append({**top, "choices": [], "usage": USAGE})
    return chunks


def _completion(answer: dict[str, Any], model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.get("text")}
    if answer.get("tool_calls"):
        message["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
            "name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}} for c in answer["tool_calls"]]  # fmt: skip
    return {"id": "chatcmpl-policy", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": answer.get("finish_reason", "stop")}],
            "usage": USAGE}  # fmt: skip


class ChatPolicy:
    def __init__(self, log: Path) -> None:
        self.log = log
        policy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    self._send(404, "application/json", b'{"error": {"message": "not found"}}')
                    return
                answer = decide("chat.completions", body, OUT_FILE)
                with policy.log.open("a") as out:
                    out.write(json.dumps({"request": body, "answer": answer}) + "\n")
                model = body.get("model") or "policy"
                if not body.get("stream"):
                    self._send(200, "application/json", json.dumps(_completion(answer, model)).encode())
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for chunk in _chunks(answer, model):
                    self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    time.sleep(0.005)  # paced, as an engine's tokens come
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def __enter__(self) -> ChatPolicy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
