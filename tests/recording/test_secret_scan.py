"""The record writer's secret-field scan covers only what a request body adds to
the session's previous one, and finds exactly what a scan of the whole body finds."""

from __future__ import annotations

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from llmtraj.core.chain import shared_prefix
from llmtraj.core.redact import may_have_secret_fields
from llmtraj.recording.secret_scan import SecretFieldScan, scan_start

KEYS = ["role", "content", "api_key", "apiKey", "password", "max_tokens", "x" * 64, "client-secret", "token"]


def body(messages: list[dict], blanks: str = "") -> bytes:
    text = json.dumps({"model": "m", "messages": messages}, separators=(",", ":"))
    return text.replace('":', f'"{blanks}:').encode()


@settings(max_examples=max(200, settings.default.max_examples), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.text(max_size=30), st.sampled_from(["", " ", "\n  "])),
                min_size=1, max_size=12), st.randoms())  # fmt: skip
def test_the_scan_of_a_growing_conversation_finds_what_a_whole_scan_finds(turns, rnd):
    scan = SecretFieldScan()
    messages: list[dict] = []
    for key, value, blanks in turns:
        messages.append({"role": "user", key: value})
        sent = body(messages, blanks)
        if rnd.random() < 0.2:  # an edit in the middle, or a cut: the prefix shrinks
            sent = sent[: rnd.randrange(len(sent))] + sent[-5:]
        assert scan.may_have_secret_fields("s", sent) == may_have_secret_fields(sent), sent


def test_a_key_across_the_repeated_part_is_seen_whole():
    first = b'{"messages":[{"role":"user","content":"hi"}],"x":{"pass'
    second = first + b'word"   :"hunter2hunter2"}}'
    assert not may_have_secret_fields(first) and may_have_secret_fields(second)
    scan = SecretFieldScan()
    assert not scan.may_have_secret_fields("s", first)
    assert scan.may_have_secret_fields("s", second)
    # the blanks between a key and its colon may run across too
    third = b'{"a":1,"api_key"      '
    scan = SecretFieldScan()
    assert not scan.may_have_secret_fields("t", third)
    assert scan.may_have_secret_fields("t", third + b'   : "k"}')
    assert scan_start(third + b":", len(third)) <= third.index(b'"api_key"')


def test_sessions_apart_and_a_body_with_secrets_is_not_remembered():
    scan = SecretFieldScan()
    secret = body([{"role": "user", "content": "x", "api_key": "sk-123"}])
    assert scan.may_have_secret_fields("s", secret)
    assert scan.may_have_secret_fields("s", secret[:-2] + b',"more":1}]}')  # scanned whole again: still found
    clean = body([{"role": "user", "content": "x"}])
    assert not scan.may_have_secret_fields("other", clean)
    assert scan.may_have_secret_fields("third", clean[:-2] + b',"password":"p"}]}')


def test_memory_is_bounded():
    scan = SecretFieldScan(sessions=3, budget=1000)
    for i in range(10):
        scan.may_have_secret_fields(f"s{i}", b'{"content": "' + b"x" * 300 + b'"}')
    assert len(scan._clean) == 3 and scan._clean.held <= 1000
    scan.may_have_secret_fields("big", b'{"content": "' + b"x" * 5000 + b'"}')
    assert scan._clean.held <= 1000


def test_shared_prefix():
    rnd = random.Random(7)
    for _ in range(500):
        a = bytes(rnd.choice(b"ab") for _ in range(rnd.randrange(40)))
        b = bytes(rnd.choice(b"ab") for _ in range(rnd.randrange(40)))
        n = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        assert shared_prefix(a, b) == n
