"""Text side of the model: the SentencePiece tokenizer, system-prompt wrapping, token display."""

from __future__ import annotations

from pathlib import Path

from .errors import PersonaplexError

EPAD = 0  # "end of padding": the step before a word starts
PAD = 3  # nothing said on the text channel this frame
SYSTEM_TAG = "<system>"
WORD_START = "\u2581"  # SentencePiece's visible space


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
        """What a live transcript shows: nothing for padding, else the piece text."""
        return "" if token in (EPAD, PAD) else self.piece(token)
