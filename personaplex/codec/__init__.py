"""Mimi neural audio codec: streaming, batched by slot, with caller-owned state.

    mimi = Mimi(config)
    enc, dec = mimi.new_encoder_state(batch, device), mimi.new_decoder_state(batch, device)
    codes = mimi.encode_frame(pcm, enc)     # [B, 1920] samples at 24 kHz -> [B, 8] codes at 12.5 Hz
    pcm = mimi.decode_frame(codes, dec)     # and back
    mimi.reset_encoder_state(enc, slots)    # slots: indices or a bool mask; other slots untouched
"""

from .mimi import DecoderState, DecoderTrace, EncoderState, EncoderTrace, Mimi
from .quantizer import SplitResidualQuantizer
from .transformer import TransformerState

__all__ = [
    "DecoderState",
    "DecoderTrace",
    "EncoderState",
    "EncoderTrace",
    "Mimi",
    "SplitResidualQuantizer",
    "TransformerState",
]
