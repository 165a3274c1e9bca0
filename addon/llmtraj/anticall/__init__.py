"""Anti-call mode without mitmproxy: the broker that holds agent calls for
drivers, the control API server and its Python client, the ROCK file channel,
and the answers built from what drivers push. `llmtraj.mitm.anticalling` is
the thin addon on top."""

from .broker import Broker
from .client import AntiCallClient, AntiCallError

__all__ = ["AntiCallClient", "AntiCallError", "Broker"]
