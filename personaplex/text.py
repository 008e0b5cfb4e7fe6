"""Text side of the model: the SentencePiece tokenizer, system-prompt wrapping, token display."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from .errors import PersonaplexError

EPAD = 0  # "end of padding": the step before a word starts
PAD = 3  # nothing said on the text channel this frame
SYSTEM_TAG = "<system>"
WORD_START = "\u2581"  # SentencePiece's visible space
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece: one byte of a UTF-8 character
# Byte pieces can spell control characters; a transcript shows them as junk, so they are left out.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class TokenizerError(PersonaplexError):
    """The text tokenizer file is missing or unreadable."""


def wrap_system_tags(prompt: str) -> str:
    """``<system> prompt <system>`` unless the stripped prompt is already wrapped; "" stays empty."""
    text = prompt.strip()
    if not text:
        return ""
    if text.startswith(SYSTEM_TAG) and text.endswith(SYSTEM_TAG) and len(text) >= 2 * len(SYSTEM_TAG):
        return text
    return f"{SYSTEM_TAG} {text} {SYSTEM_TAG}"


class TextTokenizer:
    """A SentencePiece model: text -> ids for prompts, ids -> pieces for transcripts."""

    def __init__(self, path: str | Path):
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}; pass --tokenizer PATH to a SentencePiece .model")
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except Exception as exc:
            raise TokenizerError(f"{path} is not a SentencePiece model ({exc})") from exc
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of the wrapped system prompt (no BOS/EOS), [] for an empty prompt."""
        wrapped = wrap_system_tags(prompt)
        return list(self.processor.EncodeAsIds(wrapped)) if wrapped else []

    def piece(self, token: int) -> str:
        """The token as the offline transcript shows it: EPAD / PAD for the padding ids, else its
        text with SentencePiece's word-start marker turned into a space."""
        if token == EPAD:
            return "EPAD"
        if token == PAD:
            return "PAD"
        if not 0 <= token < self.vocab_size:
            return f"<{token}>"
        return self.processor.IdToPiece(token).replace(WORD_START, " ")

    def spoken_text(self, token: int) -> str:
        """The piece text of one token, nothing for padding. A byte-fallback piece stays raw (``<0xC7>``):
        a live transcript joins them with ``SpokenText``."""
        return "" if token in (EPAD, PAD) else self.piece(token)

    def transcript(self, tokens: list[int]) -> str:
        """The words of a whole text channel (one token per frame): padding left out, byte-fallback pieces
        joined into UTF-8 characters, leading space stripped."""
        spoken = SpokenText(self)
        return ("".join(spoken.push(token) for token in tokens) + spoken.finish()).strip()


class SpokenText:
    """One conversation's text channel, token by token, as text to show: byte-fallback pieces (``<0xE2>``
    ``<0x82>`` ``<0xAC>``) are held until they form a UTF-8 character (``€``), which then comes with the token
    that completed it. A sequence cut short by an ordinary piece shows as U+FFFD. Keeps state: one per
    conversation."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text this token adds to the transcript ("" for padding and unfinished characters)."""
        if token in (EPAD, PAD):
            return ""
        piece = self.tokenizer.piece(token)
        byte = BYTE_PIECE.fullmatch(piece)
        if byte is not None:
            text = self._decoder.decode(bytes([int(byte[1], 16)]))
        else:
            text = self._decoder.decode(b"", final=True) + piece
            self._decoder.reset()
        return CONTROL_CHARACTERS.sub("", text)

    def finish(self) -> str:
        """At the end of the channel: an unfinished character as U+FFFD, else ""."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
