"""Drops mitmproxy's "Streaming response from HOST." / "Streaming request to
HOST." lines: llm-traj streams every LLM call (record, replay, anti-call), so
mitmproxy would log two info lines per call that say nothing the user asked
for, and printing them costs the proxy more CPU than the rest of a call's log.
Other mitmproxy messages are untouched."""

from __future__ import annotations

import logging

SERVER_LOGGER = "mitmproxy.proxy.server"
_STREAMING = ("Streaming response from ", "Streaming request to ")


def _not_streaming_notice(record: logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and record.msg.startswith(_STREAMING))


class QuietStreamingLog:
    def load(self, loader) -> None:
        logging.getLogger(SERVER_LOGGER).addFilter(_not_streaming_notice)

    def done(self) -> None:
        logging.getLogger(SERVER_LOGGER).removeFilter(_not_streaming_notice)
