"""Properties of the SSE parser (issue 15), with hypothesis: for any stream
(LF, CR and CRLF line ends mixed, comments, multi-line data, fields without a
space or a value, unknown fields, a BOM, invalid UTF-8, a cut-off last block)
and any split of its bytes into chunks, the parser gives the blocks one feed
gives; the blocks' bytes are the stream's, and their events are those the
WHATWG event-stream rules give, worked out here from the whole text at once."""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st
from llmtraj.core.sse import SSEBlock, SSEParser

# Field values: no line ends; NUL (an id with one is ignored), non-ASCII digits
# (not a retry), a BOM in the middle (kept), colons and spaces.
VALUE = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\r\n")
                | st.sampled_from(["\0", "²", "٣", "\ufeff", ":", " ", "7"]), max_size=12)  # fmt: skip
RETRY = st.one_of(st.integers(0, 10**12).map(str), VALUE)
NAME = st.sampled_from(["data", "event", "id", "retry", "Data", "foo", ""])
LINE = st.one_of(
    st.tuples(NAME, st.sampled_from([": ", ":", ":  "]), VALUE).map("".join),
    st.tuples(st.just("retry: "), RETRY).map("".join),
    st.sampled_from(["data", "event", "id", ":", ": keep-alive"]),  # no colon: the name alone, or a comment
).map(str.encode) | st.sampled_from([b"data: \xff\xfe", b"data: caf\xc3", b"event: \xe6\x9d"])  # invalid UTF-8
END = st.sampled_from([b"\n", b"\r\n", b"\r"])
# A block: its lines, each with its line end, then the blank line's end.
BLOCK = st.tuples(st.lists(st.tuples(LINE, END), max_size=4), END).map(
    lambda block: b"".join(line + end for line, end in block[0]) + block[1])
# The stream: an optional BOM, blocks, and maybe a last block cut off (its last line perhaps without its end).
STREAM = st.tuples(
    st.sampled_from([b"", b"\xef\xbb\xbf"]), st.lists(BLOCK, max_size=6), st.lists(st.tuples(LINE, END), max_size=2),
    st.sampled_from([b"", b"data: cut", b"\r"]),
).map(lambda s: s[0] + b"".join(s[1]) + b"".join(line + end for line, end in s[2]) + s[3])
CUTS = st.lists(st.floats(0, 1), max_size=12)

_LINE_END = re.compile(r"\r\n|\r|\n")


def spec_events(data: bytes) -> list[tuple[str, str | None, str | None, int | None]]:
    """(data, event, id, retry) of each event the stream dispatches, per
    WHATWG's rules, for the whole text at once; the id and retry a block
    carries, not the ones remembered from earlier blocks."""
    text = data.decode("utf-8", "replace").removeprefix("\ufeff")
    lines = _LINE_END.split(text)
    lines.pop()  # the text after the last line end: a line not ended, which dispatches nothing
    events, fields = [], {"data": []}
    for line in lines:
        if not line:
            if fields["data"]:
                events.append(("\n".join(fields["data"]), fields.get("event"), fields.get("id"), fields.get("retry")))
            fields = {"data": []}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            fields["data"].append(value)
        elif name == "event":
            fields["event"] = value
        elif name == "id" and "\0" not in value:
            fields["id"] = value
        elif name == "retry" and value.isascii() and value.isdigit():
            fields["retry"] = int(value)
    return events


def parsed(chunks: list[bytes]) -> list[SSEBlock]:
    parser = SSEParser()
    blocks = [block for chunk in chunks for block in parser.feed(chunk)]
    return blocks + parser.finish()


def split(data: bytes, cuts: list[float]) -> list[bytes]:
    at = sorted({round(c * len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *at], [*at, len(data)])]


@given(STREAM, CUTS)
@example("retry: \u00b2\ndata: x\n\n".encode(), [])  # isdigit() but not int(): it crashed the parser
def test_any_split_of_the_bytes_gives_the_blocks_of_one_feed(data, cuts):
    assert parsed(split(data, cuts)) == parsed([data])


@given(STREAM)
@example("retry: \u0663\ndata: x\n\n".encode())  # an Arabic-Indic 3: not a retry
def test_blocks_keep_the_bytes_and_carry_the_events_the_spec_gives(data):
    blocks = parsed([data])
    assert b"".join(block.raw for block in blocks) == data
    assert all(block.text == block.raw.decode("utf-8", "replace") for block in blocks)
    assert all(block.terminated for block in blocks[:-1])
    dispatched = [(b.data, b.event, b.id, b.retry) for b in blocks if b.terminated and b.data is not None]
    assert dispatched == spec_events(data)
