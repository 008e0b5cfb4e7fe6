"""The text channel as people read it: byte-fallback pieces (``<0xE2>`` ``<0x82>`` ``<0xAC>``) joined into
UTF-8 characters, live (one token per frame, padding in between) and for a whole channel."""

from __future__ import annotations

import pytest

from personaplex.text import EPAD, PAD, SpokenText, TextTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from personaplex.demo import demo_assets

    return TextTokenizer(demo_assets().tokenizer)


def byte_id(tokenizer, value: int) -> int:
    return tokenizer.processor.PieceToId(f"<0x{value:02X}>")


def test_text_outside_the_vocabulary_comes_back_whole(tokenizer):
    text = "Ça coûte 5 € — naïve ✓ 日本"
    ids = tokenizer.processor.EncodeAsIds(text)
    pieces = [tokenizer.piece(i) for i in ids]
    assert "<0xE2>" in pieces and "<0x82>" in pieces  # the demo tokenizer spells these with byte pieces
    assert tokenizer.transcript(ids) == text
    # As the model speaks: a token per frame with padding in between; a character comes whole with its last byte.
    spoken = SpokenText(tokenizer)
    shown = []
    for token in ids:
        shown.extend([spoken.push(token), spoken.push(PAD), spoken.push(EPAD)])
    assert "".join(shown).strip() == text
    assert all("<0x" not in part and "\ufffd" not in part for part in shown)
    assert "€" in shown and "日" in shown


def test_a_cut_short_character_and_control_bytes(tokenizer):
    spoken = SpokenText(tokenizer)
    word = tokenizer.processor.PieceToId("\u2581the")
    assert spoken.push(byte_id(tokenizer, 0xE2)) == ""  # first byte of a three-byte character
    assert spoken.push(byte_id(tokenizer, 0x82)) == ""
    assert spoken.push(word) == "\ufffd the"  # the character never finished: one replacement mark
    assert spoken.push(byte_id(tokenizer, 0x07)) == ""  # a bell character shows as nothing
    assert spoken.push(byte_id(tokenizer, 0xC3)) == "" and spoken.finish() == "\ufffd"
    assert tokenizer.transcript([byte_id(tokenizer, 0xC3), byte_id(tokenizer, 0xA9), PAD]) == "é"
