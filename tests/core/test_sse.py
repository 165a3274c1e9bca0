"""The incremental SSE parser: line endings, field rules, chunking invariance,
byte-exact `raw`, and linear work for huge lines."""

from __future__ import annotations

import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

import pytest
from llmtraj.core import sse as sse_module
from llmtraj.core.sse import SSEBlock, SSEParser
from llmtraj.testing.standin import FIXTURES
from openai._streaming import SSEDecoder

STREAMS = FIXTURES
FIXTURES = sorted(STREAMS.glob("*.sse"))


def parse(chunks: list[bytes]) -> list[SSEBlock]:
    parser = SSEParser()
    blocks: list[SSEBlock] = []
    for chunk in chunks:
        blocks += parser.feed(chunk)
    return blocks + parser.finish()


def one_shot(data: bytes) -> list[SSEBlock]:
    return parse([data])


def byte_at_a_time(data: bytes) -> list[SSEBlock]:
    return parse([data[i : i + 1] for i in range(len(data))])


def random_chunks(data: bytes, seed: int, max_size: int = 64) -> list[bytes]:
    rng = random.Random(seed)
    chunks, i = [], 0
    while i < len(data):
        n = rng.randint(1, max_size)
        chunks.append(data[i : i + n])
        i += n
    return chunks


def view(blocks: list[SSEBlock]) -> list[tuple]:
    return [(b.raw, b.data, b.event, b.id, b.retry, b.terminated) for b in blocks]


def datas(blocks: list[SSEBlock]) -> list[str | None]:
    return [b.data for b in blocks]


def test_fixtures_exist():
    assert len(FIXTURES) >= 7
    assert any(b"\r\n" in f.read_bytes() for f in FIXTURES), "one CRLF fixture"


# ------------------------------------------------------------------ line endings


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings(nl):
    stream = b"event: ping" + nl + b"data: a" + nl + b"data: b" + nl + nl + b"data: c" + nl + nl
    blocks = one_shot(stream)
    assert datas(blocks) == ["a\nb", "c"]
    assert [b.event for b in blocks] == ["ping", None]
    assert all(b.terminated for b in blocks)
    assert blocks[0].raw == b"event: ping" + nl + b"data: a" + nl + b"data: b" + nl + nl
    assert blocks[1].raw == b"data: c" + nl + nl
    assert b"".join(b.raw for b in blocks) == stream
    assert view(byte_at_a_time(stream)) == view(blocks)


def test_mixed_line_endings_in_one_block():
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"
    blocks = one_shot(stream)
    assert datas(blocks) == ["a\nb\nc", "d"]
    assert b"".join(b.raw for b in blocks) == stream


def test_crlf_split_across_feeds():
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    # LF completing the CRLF must not count as a second (blank) line
    assert parser.feed(b"\n\r") == []
    blocks = parser.feed(b"\ndata: y\r")
    assert [(b.raw, b.data) for b in blocks] == [(b"data: x\r\n\r\n", "x")]
    blocks = parser.feed(b"\n\r\n")
    assert [(b.raw, b.data) for b in blocks] == [(b"data: y\r\n\r\n", "y")]
    assert parser.finish() == []


def test_event_ending_a_feed_with_crlf_is_dispatched_at_once():
    # a complete CRLF at the end of a feed is not half of anything: holding it
    # back would stamp every event of a CRLF stream with the next chunk's time
    parser = SSEParser()
    assert datas(parser.feed(b"data: x\r\n\r\n")) == ["x"]
    assert datas(parser.feed(b"data: y\r\n\r\n")) == ["y"]
    data = (STREAMS / "openai_chat_basic_crlf.sse").read_bytes()
    parser = SSEParser()
    for raw in data.split(b"\r\n\r\n")[:-1]:
        assert len(parser.feed(raw + b"\r\n\r\n")) == 1
    assert parser.finish() == []


def test_every_two_way_split_of_a_crlf_stream_matches_one_shot():
    stream = b": hi\r\n\r\nevent: e\r\ndata: 1\r\n\r\ndata: 2\r\ndata: 3\r\n\r\n"
    expected = view(one_shot(stream))
    assert datas(one_shot(stream)) == [None, "1", "2\n3"]
    for i in range(len(stream) + 1):
        assert view(parse([stream[:i], stream[i:]])) == expected, i


def test_lone_cr_at_end_of_feed_is_a_line_end_when_next_byte_is_not_lf():
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    blocks = parser.feed(b"\rdata: y\r\r")  # CR CR: blank line; trailing CR held
    assert [(b.raw, b.data) for b in blocks] == [(b"data: x\r\r", "x")]
    tail = parser.finish()  # the held CR is a line end at the end of the stream
    assert [(b.raw, b.data, b.terminated) for b in tail] == [(b"data: y\r\r", "y", True)]


# ----------------------------------------------------------------- field rules


def test_multi_line_data_and_value_rules():
    stream = (
        b"data: first\n"
        b"data:second\n"  # no space after the colon
        b"data:  two spaces\n"  # only one space is stripped
        b"data: a: b\n"  # colons inside the value stay
        b"data\n"  # a field name alone: empty value
        b"data:\n"
        b"\n"
    )
    [block] = one_shot(stream)
    assert block.data == "first\nsecond\n two spaces\na: b\n\n"


def test_empty_data_value_is_an_empty_event_not_none():
    [block] = one_shot(b"data:\n\n")
    assert block.data == ""


def test_comments_and_keep_alive_blocks():
    stream = b": keep-alive\n\n:\n\n: comment inside\ndata: x\n: another\n\n\n"
    blocks = one_shot(stream)
    assert datas(blocks) == [None, None, "x", None]
    assert blocks[0].raw == b": keep-alive\n\n"
    assert blocks[1].raw == b":\n\n"
    assert blocks[2].raw == b": comment inside\ndata: x\n: another\n\n"
    assert blocks[3].raw == b"\n"  # a stray blank line is kept as its own block
    assert b"".join(b.raw for b in blocks) == stream


def test_event_id_retry_fields():
    stream = (
        b"event: completion\nid: 42\nretry: 3000\ndata: {}\n\n"
        b"data: plain\n\n"
        b"retry: 3s\nid: bad\x00id\nfoo: ignored\ndata: z\n\n"
    )
    a, b, c = one_shot(stream)
    assert (a.event, a.id, a.retry, a.data) == ("completion", "42", 3000, "{}")
    assert (b.event, b.retry, b.data) == (None, None, "plain")  # fields do not leak
    assert c.retry is None  # not all digits: ignored
    assert c.id != "bad\x00id"  # ids containing NUL are ignored
    assert c.data == "z"


def test_event_without_data_dispatches_no_data():
    [block] = one_shot(b"event: ping\n\n")
    assert block.event == "ping" and block.data is None


def test_bom_at_stream_start_is_ignored_but_kept_in_raw():
    stream = b"\xef\xbb\xbfdata: x\n\ndata: y\n\n"
    for blocks in (one_shot(stream), byte_at_a_time(stream)):
        assert datas(blocks) == ["x", "y"]
        assert blocks[0].raw == b"\xef\xbb\xbfdata: x\n\n"


def test_bom_later_in_the_stream_is_not_stripped():
    # per the spec only the stream's first BOM is skipped; later it is part of the field name
    blocks = one_shot(b"data: a\n\n\xef\xbb\xbfdata: b\n\n")
    assert datas(blocks) == ["a", None]


def test_done_sentinel():
    blocks = one_shot(b'data: {"a":1}\n\ndata: [DONE]\n\n')
    assert datas(blocks) == ['{"a":1}', "[DONE]"]


# -------------------------------------------------------------- end of stream


def test_finish_with_unterminated_last_block():
    parser = SSEParser()
    blocks = parser.feed(b"data: a\n\ndata: b")
    assert datas(blocks) == ["a"]
    [tail] = parser.finish()
    assert (tail.raw, tail.data, tail.terminated) == (b"data: b", "b", False)
    assert parser.finish() == []


def test_finish_with_complete_line_but_no_blank_line():
    blocks = one_shot(b"data: a\n\nevent: x\ndata: b\n")
    assert [(b.data, b.event, b.terminated) for b in blocks] == [("a", None, True), ("b", "x", False)]
    assert blocks[1].raw == b"event: x\ndata: b\n"


def test_finish_on_empty_or_clean_stream():
    assert SSEParser().finish() == []
    parser = SSEParser()
    parser.feed(b"data: a\n\n")
    assert parser.finish() == []


def test_multibyte_utf8_split_across_chunks():
    stream = "data: 杭州 🙂 café\n\n".encode()
    for i in range(len(stream) + 1):
        blocks = parse([stream[:i], stream[i:]])
        assert datas(blocks) == ["杭州 🙂 café"], i
    assert datas(byte_at_a_time(stream)) == ["杭州 🙂 café"]


def test_invalid_utf8_is_replaced_not_raised():
    [block] = one_shot(b"data: \xff\xfe ok\n\n")
    assert block.data == "\ufffd\ufffd ok"
    assert block.raw == b"data: \xff\xfe ok\n\n"


# ---------------------------------------------------- chunking invariance, raw


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_fixture_byte_at_a_time_equals_one_shot(fixture):
    data = fixture.read_bytes()
    expected = view(one_shot(data))
    assert view(byte_at_a_time(data)) == expected
    for seed in range(3):
        assert view(parse(random_chunks(data, seed))) == expected


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_fixture_events_match_the_openai_sdk_decoder(fixture):
    data = fixture.read_bytes()
    ours = [b.data for b in one_shot(data) if b.data is not None]
    sdk = [e.data for e in SSEDecoder().iter_bytes(iter([data]))]
    assert ours == sdk
    assert ours[-1] == "[DONE]"
    assert all(b.terminated for b in one_shot(data))


@pytest.mark.parametrize(
    "tail",
    [b"", b"data: partial", b"data: partial\n", b"data: partial\r", b": comment", b"\xef\xbb"],
    ids=["none", "no-eol", "no-blank-line", "lone-cr", "comment", "half-utf8"],
)
@pytest.mark.parametrize("fixture", FIXTURES[:3] + FIXTURES[-2:], ids=lambda p: p.name)
def test_raw_concatenation_is_the_input_exactly(fixture, tail):
    data = fixture.read_bytes() + tail
    for chunks in ([data], random_chunks(data, 7), random_chunks(data, 8, max_size=3)):
        blocks = parse(chunks)
        assert b"".join(b.raw for b in blocks) == data
        assert all(b.terminated for b in blocks[:-1])
        assert blocks[-1].terminated == (tail == b"")


# ------------------------------------------------------------------ complexity


class _Counter:
    """Stands in for the parser's searches for a block's end (`_lf_block_end`
    in a stream without CRs, the `_BLOCK_END` regex in one with) and totals
    the bytes each covers: from its start offset to the end it found, or to the
    end of the buffer when there is none."""

    def __init__(self, monkeypatch):
        self.scanned = 0
        self.calls = 0
        find, pattern = sse_module._lf_block_end, sse_module._BLOCK_END
        counter = self

        def lf_block_end(data, pos):
            found = find(data, pos)
            counter._count(pos, found + 2 if found >= 0 else len(data))
            return found

        class Pattern:
            def search(self, data, pos=0):
                m = pattern.search(data, pos)
                counter._count(pos, m.end() if m else len(data))
                return m

        monkeypatch.setattr(sse_module, "_lf_block_end", lf_block_end)
        monkeypatch.setattr(sse_module, "_BLOCK_END", Pattern())

    def _count(self, start: int, end: int) -> None:
        self.calls += 1
        self.scanned += end - start


@pytest.mark.parametrize("nl", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_huge_single_line_is_scanned_linearly(monkeypatch, nl):
    counter = _Counter(monkeypatch)
    payload = b"x" * (5 * 1024 * 1024)
    stream = b"data: " + payload + nl + nl
    chunk = 5 * 1024
    parser = SSEParser()
    blocks: list[SSEBlock] = []
    for i in range(0, len(stream), chunk):
        blocks += parser.feed(stream[i : i + chunk])
    blocks += parser.finish()
    assert len(blocks) == 1 and len(blocks[0].data) == len(payload)
    assert blocks[0].raw == stream
    # Rescanning the pending block on every feed would look at ~n^2/(2*chunk) = 2.7 GB.
    assert counter.scanned <= 2 * len(stream), counter.scanned
    assert counter.calls <= 2 * (len(stream) // chunk + 1) + 10


@pytest.mark.parametrize("nl", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_many_small_events_in_one_feed_scan_linearly(monkeypatch, nl):
    counter = _Counter(monkeypatch)
    stream = b"".join(b'data: {"i":%d}%s%s' % (i, nl, nl) for i in range(20000))
    blocks = SSEParser().feed(stream)
    assert len(blocks) == 20000
    assert [b.data for b in blocks[:2]] == ['{"i":0}', '{"i":1}']
    assert counter.scanned <= 2 * len(stream)
    assert counter.calls <= 20000 + 2  # one per block, plus the final miss


def test_a_chunk_of_whole_blocks_is_not_buffered():
    parser = SSEParser()
    stream = b"data: a\n\nevent: e\ndata: b\n\n"
    blocks = parser.feed(stream)
    assert [(b.raw, b.data, b.event) for b in blocks] == [(b"data: a\n\n", "a", None), (b"event: e\ndata: b\n\n", "b", "e")]
    assert parser._buf == b""  # nothing is left in the buffer
    chunk = b"data: c\n\n"
    [only] = parser.feed(chunk)
    assert only.raw is chunk and only.text == "data: c\n\n"  # the chunk itself, not a copy


def test_text_is_raw_decoded():
    data = "data: café\n\n: \xff\n\n".encode("utf-8").replace(b"\xc3\xbf", b"\xff")
    blocks = one_shot(data)
    assert [b.text for b in blocks] == [b.raw.decode("utf-8", errors="replace") for b in blocks]
    assert blocks[1].text == ": \ufffd\n\n"
