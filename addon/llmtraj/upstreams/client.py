"""Sends a call upstream with retries and timeouts, for the routes that ask
for them (mitmproxy forwards the others itself).

Retries happen only before anything reaches the agent: a connect error, a
response head not arriving in time, or a retryable status (by default 429,
500, 502, 503) is retried after an exponential backoff with jitter, or after
what the upstream's `Retry-After` / `retry-after-ms` asks. The last failure
goes to the agent as it is (its real status and body); when no response came
at all, as a 502 (unreachable) or 504 (timed out). The body then streams
through untouched (still content-encoded), each piece within the idle timeout.
Knows nothing of mitmproxy.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypedDict

import httpx

from ..core.headers import HOP_BY_HOP
from .registry import RetryPolicy

# Not forwarded either way: hop-by-hop headers, Host (set from the URL), proxy credentials, the length (redone).
_NOT_FORWARDED = HOP_BY_HOP | {"host", "proxy-authorization", "proxy-authenticate", "content-length"}


class Attempt(TypedDict):
    """One try, as the record keeps it (plain values: it also sits in mitmproxy's flow metadata)."""

    started_at: float
    waited: float  # seconds of backoff before it
    status: int | None
    error: str | None  # why no response came


class UpstreamFailure(Exception):
    """No response after the last attempt; `kind` is the record's error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]


def retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds the upstream asks to wait: `retry-after-ms`, else `Retry-After`
    in seconds or as an HTTP date; None when it says nothing usable."""
    try:
        return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except (KeyError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(retry: int, policy: RetryPolicy, rng: random.Random) -> float:
    """The wait before retry number `retry` (0-based): exponential, capped, and
    jittered in its upper half so that agents failing together do not retry together."""
    ceiling = min(policy.backoff_max, policy.backoff_initial * 2**retry)
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def forward_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in headers if k.lower() not in _NOT_FORWARDED]
    if not any(k.lower() == "accept-encoding" for k, _ in kept):
        kept.append(("accept-encoding", "identity"))  # httpx would otherwise ask for compression the agent did not
    return kept


class UpstreamClient:
    """One shared connection pool for every call that needs retries or timeouts."""

    def __init__(self, *, verify: bool = True, rng: random.Random | None = None) -> None:
        # As mitmproxy's own forwarding: no cap on connections (many agents stream
        # at once), no proxy from the environment; no read timeout either: the
        # first-byte and idle limits are per route, applied here.
        self._client = httpx.AsyncClient(
            verify=verify, timeout=httpx.Timeout(None), follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
        )  # fmt: skip
        self._rng = rng or random.Random()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes, policy: RetryPolicy,
        attempts: list[Attempt],
    ) -> UpstreamResponse:
        """The upstream's response, after retries; `attempts` gets each attempt as it ends.
        Raises UpstreamFailure when no response came."""
        request = self._client.build_request(
            method, url, headers=forward_headers(headers), content=body,
            timeout=httpx.Timeout(None, connect=policy.connect_timeout),
        )
        waited = 0.0
        for retry in range(policy.retries + 1):
            if waited:
                await asyncio.sleep(waited)
            attempt = Attempt(started_at=time.time(), waited=round(waited, 3), status=None, error=None)
            attempts.append(attempt)
            last = retry == policy.retries
            try:
                response = await asyncio.wait_for(self._client.send(request, stream=True), policy.first_byte_timeout)
            except (httpx.TransportError, TimeoutError) as exc:
                failure = _failure(exc, policy)
                attempt["error"] = failure.message
                if last:
                    raise failure from None
                waited = backoff_delay(retry, policy, self._rng)
                continue
            attempt["status"] = response.status_code
            if not last and response.status_code in policy.statuses:
                asked = retry_after(response.headers)
                if asked is None or asked <= policy.max_retry_wait:
                    await response.aclose()
                    waited = asked if asked is not None else backoff_delay(retry, policy, self._rng)
                    continue
            headers_out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
            return UpstreamResponse(
                response.status_code,
                [(k, v) for k, v in headers_out if k.lower() not in _NOT_FORWARDED],
                _body(response, policy.idle_timeout),
            )
        raise AssertionError("unreachable")  # the last attempt returns or raises


def _failure(exc: BaseException, policy: RetryPolicy) -> UpstreamFailure:
    if isinstance(exc, TimeoutError):
        return UpstreamFailure("upstream_timeout", f"upstream sent no response within {policy.first_byte_timeout:g} s (first_byte timeout)")
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamFailure("upstream_timeout", f"upstream connection not made within {policy.connect_timeout:g} s (connect timeout)")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamFailure("upstream_unreachable", f"upstream unreachable: {exc or type(exc).__name__}")
    return UpstreamFailure("upstream_disconnected", f"upstream failed before responding: {exc or type(exc).__name__}")


class UpstreamStalled(ConnectionError):
    """The body stopped: the agent's connection is closed, as the upstream's would be.
    `kind` is the record's error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


async def _body(response: httpx.Response, idle: float | None) -> AsyncIterator[bytes]:
    pieces = response.aiter_raw()
    try:
        while True:
            try:
                piece = await asyncio.wait_for(anext(pieces), idle)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamStalled("upstream_timeout", f"upstream sent nothing for {idle:g} s (idle timeout)") from None
            except httpx.TransportError as exc:
                raise UpstreamStalled("upstream_disconnected", f"upstream broke off the response: {exc or type(exc).__name__}") from None
            yield piece
    finally:
        await response.aclose()
