"""Reassembly of cloud text streams: chunks arrive duplicated, out of order or with gaps;
the device delivers each piece of text once, in order, or ends the stream with an error."""

from __future__ import annotations

import pytest

from edge.text_uplink import ChunkReassembler, StreamBroken
from shared.envelopes import TextChunkEnvelope, TextUsage, decode_envelope, frame


def chunk(seq: int, text: str = "", final: bool = False) -> TextChunkEnvelope:
    usage = TextUsage(prompt_tokens=3, completion_tokens=seq) if final else None
    return TextChunkEnvelope(
        request_id="r1",
        seq=seq,
        text=text,
        final=final,
        finish_reason="stop" if final else None,
        usage=usage,
    )


def deliver(chunks: ChunkReassembler, arrivals: list[TextChunkEnvelope]) -> str:
    out: list[str] = []
    for arrival in arrivals:
        out.extend(c.text for c in chunks.add(arrival))
    return "".join(out)


def test_in_order_chunks_pass_straight_through() -> None:
    chunks = ChunkReassembler()
    text = deliver(chunks, [chunk(0), chunk(1, "a"), chunk(2, "b"), chunk(3, final=True)])
    assert text == "ab"
    assert chunks.finished


def test_duplicates_are_dropped() -> None:
    chunks = ChunkReassembler()
    arrivals = [chunk(0), chunk(1, "a"), chunk(1, "a"), chunk(0), chunk(2, "b"), chunk(2, "b")]
    assert deliver(chunks, arrivals) == "ab"


def test_reordered_chunks_are_put_back_in_order() -> None:
    chunks = ChunkReassembler()
    assert deliver(chunks, [chunk(2, "b"), chunk(3, "c")]) == ""  # held: 0 and 1 missing
    assert chunks.waiting
    assert deliver(chunks, [chunk(1, "a"), chunk(3, "c")]) == ""
    assert deliver(chunks, [chunk(0, "")]) == "abc"
    assert not chunks.waiting


def test_a_gap_wider_than_the_window_is_an_error() -> None:
    chunks = ChunkReassembler(window=4)
    deliver(chunks, [chunk(0), chunk(1, "a")])
    with pytest.raises(StreamBroken, match="lost chunk 2"):
        chunks.add(chunk(6, "x"))


def test_nothing_is_delivered_after_the_final_chunk() -> None:
    chunks = ChunkReassembler()
    assert deliver(chunks, [chunk(0), chunk(2, final=True), chunk(1, "a")]) == "a"
    assert chunks.finished
    assert deliver(chunks, [chunk(3, "late"), chunk(1, "a")]) == ""


def test_chunks_survive_the_wire() -> None:
    sent = chunk(4, final=True)
    received, tail = decode_envelope(frame(sent.dump()))
    assert isinstance(received, TextChunkEnvelope)
    assert received == sent.model_copy(update={"schema_version": "1.0"})
    assert not bytes(tail)
