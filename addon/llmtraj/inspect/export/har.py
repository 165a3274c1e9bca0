"""HAR 1.2 (see `llmtraj.inspect.export`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ...core.headers import header
from ...core.record import CallRecord, Headers
from .common import iso_time, llm_traj_version

# -------------------------------------------------------------------- har


def har(records: Iterable[CallRecord]) -> dict[str, Any]:
    entries = [_har_entry(r) for r in sorted(records, key=lambda r: r.timings.started_at)]
    return {"log": {"version": "1.2", "creator": {"name": "llm-traj", "version": llm_traj_version()}, "entries": entries}}


def _har_headers(headers: Headers) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in headers]


def _har_entry(record: CallRecord) -> dict[str, Any]:
    t = record.timings
    end = t.ended_at or t.response_headers_at or t.started_at
    headers_at = t.response_headers_at or end
    wait = round(max(0.0, headers_at - t.started_at) * 1000, 3)
    receive = round(max(0.0, end - headers_at) * 1000, 3)

    if record.request_raw is not None:
        request_text = record.request_raw
    else:
        request_text = json.dumps(record.request, ensure_ascii=False) if record.request is not None else ""
    query = parse_qsl(urlsplit(record.url).query, keep_blank_values=True)
    request: dict[str, Any] = {
        "method": record.method,
        "url": record.url,
        "httpVersion": "",
        "cookies": [],
        "headers": _har_headers(record.request_headers),
        "queryString": [{"name": k, "value": v} for k, v in query],
        "headersSize": -1,
        "bodySize": len(request_text.encode()),
    }
    if request_text:
        mime = header(record.request_headers, "content-type") or "application/json"
        request["postData"] = {"mimeType": mime, "text": request_text}

    if record.events is not None:
        text = "".join(event.raw for event in record.events)
    elif record.response_raw is not None:
        text = record.response_raw
    else:
        text = json.dumps(record.response, ensure_ascii=False) if record.response is not None else ""
    size = len(text.encode())
    status = record.status or 0
    response: dict[str, Any] = {
        "status": status,
        "statusText": HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "",
        "httpVersion": "",
        "cookies": [],
        "headers": _har_headers(record.response_headers),
        "content": {"size": size, "mimeType": header(record.response_headers, "content-type") or "", "text": text},
        "redirectURL": "",
        "headersSize": -1,
        # The text is decoded; what a content-encoded body weighed on the wire was not recorded.
        "bodySize": -1 if header(record.response_headers, "content-encoding") else size,
    }
    if record.error is not None:
        response["_error"] = f"{record.error.kind}: {record.error.message}"

    return {
        "startedDateTime": iso_time(t.started_at),
        "time": round(wait + receive, 3),
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"send": 0, "wait": wait, "receive": receive},
        "_llm_traj": {"session": record.session, "index": record.index, "api": record.api, "mode": record.mode},
    }
