"""The Mimi codec, streaming one 80 ms frame per call for a batch of independent slots.

Encode: 1920 samples at 24 kHz -> SEANet encoder -> 2 latent frames at 25 Hz -> encoder transformer ->
downsample to 1 frame at 12.5 Hz -> 8 codes. Decode runs the mirror path. The module holds weights only;
every bit of streaming memory lives in an ``EncoderState`` / ``DecoderState`` that the caller allocates
(``new_encoder_state``), passes to each call, and may reset slot by slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..config import MimiConfig
from .conv import CausalConv1d, CausalConvTranspose1d
from .quantizer import SplitResidualQuantizer
from .seanet import SeanetDecoder, SeanetEncoder
from .slots import fill_slots_, slot_mask
from .transformer import MimiTransformer, TransformerState, stream_function


class Downsample(nn.Module):
    """Learnt causal conv, kernel 2*stride, from the 25 Hz encoder rate to the 12.5 Hz code rate.

    Unlike the SEANet convs, the reference pads a stream's first call by *replicating* its first frame,
    so a fresh slot needs a flag: its tail is filled from the incoming frame instead of being zeros.
    """

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv = CausalConv1d(dim, dim, 2 * stride, stride=stride, bias=False)

    def forward(self, x: torch.Tensor, tail: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """x: [B, dim, T] -> [B, dim, T // stride]; ``tail`` and ``fresh`` [B] updated in place."""
        first_frame = x[..., :1].expand_as(tail)
        tail.copy_(torch.where(fresh[:, None, None], first_frame, tail))
        fresh.fill_(False)
        return self.conv(x, tail)


class Upsample(nn.Module):
    """Depthwise (one filter per channel) causal transposed conv, kernel 2*stride: 12.5 Hz -> 25 Hz."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.convtr = CausalConvTranspose1d(dim, dim, 2 * stride, stride=stride, groups=dim, bias=False)

    def forward(self, x: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
        """x: [B, dim, T] -> [B, dim, stride * T]; ``pending`` updated in place."""
        return self.convtr(x, pending)


@dataclass
class EncoderState:
    """Everything the encoder remembers between calls; every tensor has one row per slot."""

    seanet: list[torch.Tensor]  # input tail of each SEANet conv, in network order
    transformer: TransformerState
    downsample_tail: torch.Tensor  # [B, dim, kernel - stride] latent frames the next window still needs
    downsample_fresh: torch.Tensor  # [B] bool: no frame seen yet (first call pads by replication)

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor (e.g. to snapshot around CUDA graph warm-up)."""
        return [*self.seanet, *self.transformer.tensors(), self.downsample_tail, self.downsample_fresh]

    def slots(self, first: int, stop: int) -> "EncoderState":
        """A view of slots ``first..stop-1``: writes through it change this state."""
        return EncoderState(
            [t[first:stop] for t in self.seanet], self.transformer.slots(first, stop),
            self.downsample_tail[first:stop], self.downsample_fresh[first:stop],
        )

    def reset_slots(self, mask: torch.Tensor) -> None:
        for tensor in (*self.seanet, *self.transformer.tensors(), self.downsample_tail):
            fill_slots_(tensor, mask, 0)
        fill_slots_(self.downsample_fresh, mask, True)


@dataclass
class DecoderState:
    """Everything the decoder remembers between calls; every tensor has one row per slot."""

    upsample_pending: torch.Tensor  # [B, dim, kernel - stride] outputs still receiving contributions
    transformer: TransformerState
    seanet: list[torch.Tensor]  # input tail / pending outputs of each SEANet (transposed) conv

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor (e.g. to snapshot around CUDA graph warm-up)."""
        return [self.upsample_pending, *self.transformer.tensors(), *self.seanet]

    def slots(self, first: int, stop: int) -> "DecoderState":
        """A view of slots ``first..stop-1``: writes through it change this state."""
        return DecoderState(
            self.upsample_pending[first:stop], self.transformer.slots(first, stop), [t[first:stop] for t in self.seanet]
        )

    def reset_slots(self, mask: torch.Tensor) -> None:
        for tensor in self.tensors():
            fill_slots_(tensor, mask, 0)


class EncoderTrace(NamedTuple):
    """Intermediate values of one ``encode_frame`` call (conv layout: [batch, channel, time])."""

    seanet_out: torch.Tensor  # [B, dim, 2] at 25 Hz
    transformer_out: torch.Tensor  # [B, dim, 2] at 25 Hz
    latent: torch.Tensor  # [B, dim, 1] at 12.5 Hz, what the quantizer sees
    codes: torch.Tensor  # [B, num_codebooks] int64


class DecoderTrace(NamedTuple):
    """Intermediate values of one ``decode_frame`` call (conv layout: [batch, channel, time])."""

    latent: torch.Tensor  # [B, dim, 1] at 12.5 Hz, the quantizer's decode of the codes
    upsampled: torch.Tensor  # [B, dim, 2] at 25 Hz
    transformer_out: torch.Tensor  # [B, dim, 2] at 25 Hz
    pcm: torch.Tensor  # [B, frame_size] at 24 kHz


@dataclass(frozen=True)
class StreamKernels:
    """The functions Mimi's streaming transformers run with: (x [B, T, dim], state) -> [B, T, dim]."""

    kind: str  # a ``stream_function`` kind
    encoder: Callable
    decoder: Callable


class Mimi(nn.Module):
    """Mimi codec weights with the reference checkpoint's state-dict keys; stateless streaming steps.

    Steps launch no host synchronisation and loop over no batch entries, so they can be captured in a
    CUDA graph. Every step runs without autograd.
    """

    def __init__(self, config: MimiConfig):
        super().__init__()
        seanet, dim = config.seanet, config.seanet.dimension
        if config.transformer.d_model != dim:
            raise ValueError(f"transformer d_model ({config.transformer.d_model}) must equal the latent width ({dim})")
        if config.frame_size % seanet.hop_length or config.encoder_frames_per_frame < 1:
            raise ValueError(f"frame size {config.frame_size} is not a multiple of the SEANet hop {seanet.hop_length}")
        self.config = config
        # Registration order follows the reference, so state_dict() lists keys in the file's order.
        self.encoder = SeanetEncoder(seanet)
        self.decoder = SeanetDecoder(seanet)
        self.encoder_transformer = MimiTransformer(config.transformer)
        self.decoder_transformer = MimiTransformer(config.transformer)
        self.quantizer = SplitResidualQuantizer(
            dim, config.quantizer_dim, config.quantizer_bins, config.quantizer_total_codebooks, config.num_codebooks
        )
        self.downsample = Downsample(dim, config.encoder_frames_per_frame)
        self.upsample = Upsample(dim, config.encoder_frames_per_frame)

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920 at 24 kHz / 12.5 Hz)."""
        return self.config.frame_size

    # --- state -------------------------------------------------------------------------------------

    def stream_kernels(self, kind: str = "eager") -> "StreamKernels":
        """The functions frame-by-frame encode/decode run their transformers with (``stream_function``
        kinds: "eager", "math", "compile"); pass them to ``encode_frame``/``decode_frame``."""
        return StreamKernels(
            kind, stream_function(self.encoder_transformer.transformer, kind),
            stream_function(self.decoder_transformer.transformer, kind),
        )

    def new_encoder_state(self, batch_size: int, device: torch.device | str) -> EncoderState:
        """Preallocated encoder memory for ``batch_size`` slots, all fresh."""
        conv: CausalConv1d = self.downsample.conv
        return EncoderState(
            seanet=self.encoder.new_state(batch_size, device),
            transformer=self.encoder_transformer.new_state(batch_size, device),
            downsample_tail=conv.new_state(batch_size, device),
            downsample_fresh=torch.ones(batch_size, dtype=torch.bool, device=device),
        )

    def new_decoder_state(self, batch_size: int, device: torch.device | str) -> DecoderState:
        """Preallocated decoder memory for ``batch_size`` slots, all fresh."""
        convtr: CausalConvTranspose1d = self.upsample.convtr
        return DecoderState(
            upsample_pending=convtr.new_state(batch_size, device),
            transformer=self.decoder_transformer.new_state(batch_size, device),
            seanet=self.decoder.new_state(batch_size, device),
        )

    def reset_encoder_state(self, state: EncoderState, slots: torch.Tensor) -> None:
        """Make the given slots fresh (LongTensor of indices or BoolTensor [B] mask); others are untouched."""
        flags = state.downsample_fresh
        state.reset_slots(slot_mask(slots, flags.shape[0], flags.device))

    def reset_decoder_state(self, state: DecoderState, slots: torch.Tensor) -> None:
        """Make the given slots fresh (LongTensor of indices or BoolTensor [B] mask); others are untouched."""
        counter = state.transformer.position
        state.reset_slots(slot_mask(slots, counter.shape[0], counter.device))

    # --- streaming steps ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode_frame_traced(
        self, pcm: torch.Tensor, state: EncoderState, kernels: "StreamKernels | None" = None,
    ) -> EncoderTrace:
        """``encode_frame`` returning its intermediate values too."""
        if pcm.dim() != 2 or pcm.shape[1] != self.frame_size:
            raise ValueError(f"expected pcm [batch, {self.frame_size}], got {list(pcm.shape)}")
        seanet_out = self.encoder(pcm[:, None, :], state.seanet)
        stream = kernels.encoder if kernels is not None else None
        transformer_out = self.encoder_transformer(seanet_out, state.transformer, stream)
        latent = self.downsample(transformer_out, state.downsample_tail, state.downsample_fresh)
        codes = self.quantizer.encode(latent)[:, :, 0]
        return EncoderTrace(seanet_out, transformer_out, latent, codes)

    def encode_frame(
        self, pcm: torch.Tensor, state: EncoderState, kernels: "StreamKernels | None" = None,
    ) -> torch.Tensor:
        """Encode the next 80 ms of every slot.

        pcm: [B, 1920] float samples at 24 kHz -> codes [B, 8] int64 (one 12.5 Hz frame); ``state`` advances.
        kernels: how the transformer runs (``stream_kernels``), eagerly if None.
        """
        return self.encode_frame_traced(pcm, state, kernels).codes

    @torch.no_grad()
    def encode_clip_traced(self, pcm: torch.Tensor, state: EncoderState) -> EncoderTrace:
        """``encode_clip`` returning its intermediate values too, over the whole clip.

        Shapes for N frames: seanet_out and transformer_out [B, dim, 2N], latent [B, dim, N], codes
        [B, N, num_codebooks] (time before codebooks, unlike ``encode_frame_traced``'s [B, num_codebooks]).
        """
        frame = self.frame_size
        if pcm.dim() != 2 or pcm.shape[1] == 0 or pcm.shape[1] % frame:
            raise ValueError(f"expected pcm [batch, N * {frame}] with N >= 1 whole frames, got {list(pcm.shape)}")
        # Every stage below is the streaming step applied to the whole clip at once:
        # - SEANet: each causal conv prepends its carried tail and computes every complete window; with
        #   N * 1920 samples each conv gets a multiple of its stride, so the windows (and the tail kept
        #   afterwards) are exactly those of N successive calls.
        # - Transformer: ``prefill`` reproduces the 2-frames-per-call visibility (ring quirk included)
        #   and leaves the KV rings and position as N calls would.
        # - Downsample: a causal conv with stride 2 over the 2N frames, replicate-padded if the slot is
        #   fresh, which only concerns its first call, i.e. the clip's first frame.
        # - Quantizer: per 12.5 Hz frame, no memory.
        seanet_out = self.encoder(pcm[:, None, :], state.seanet)
        transformer_out = self.encoder_transformer.prefill(seanet_out, state.transformer)
        latent = self.downsample(transformer_out, state.downsample_tail, state.downsample_fresh)
        codes = self.quantizer.encode(latent).transpose(1, 2)
        return EncoderTrace(seanet_out, transformer_out, latent, codes)

    def encode_clip(self, pcm: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """Encode N whole frames of every slot in one parallel pass (e.g. a voice prompt).

        pcm: [B, N * 1920] float samples at 24 kHz -> codes [B, N, 8] int64. Equal to N successive
        ``encode_frame`` calls from the same ``state`` (fresh or not), which is left as those calls would
        leave it, so streaming can continue with ``encode_frame``. Floats agree with streaming up to
        rounding (the reductions are grouped differently); codes are the same unless a latent sits within
        rounding of a tie between two centroids.
        """
        return self.encode_clip_traced(pcm, state).codes

    @torch.no_grad()
    def decode_frame_traced(
        self, codes: torch.Tensor, state: DecoderState, kernels: "StreamKernels | None" = None,
    ) -> DecoderTrace:
        """``decode_frame`` returning its intermediate values too."""
        if codes.dim() != 2 or codes.shape[1] < 2:
            raise ValueError(f"expected codes [batch, codebooks >= 2], got {list(codes.shape)}")
        latent = self.quantizer.decode(codes[:, :, None])
        upsampled = self.upsample(latent, state.upsample_pending)
        stream = kernels.decoder if kernels is not None else None
        transformer_out = self.decoder_transformer(upsampled, state.transformer, stream)
        pcm = self.decoder(transformer_out, state.seanet)[:, 0, :]
        return DecoderTrace(latent, upsampled, transformer_out, pcm)

    def decode_frame(
        self, codes: torch.Tensor, state: DecoderState, kernels: "StreamKernels | None" = None,
    ) -> torch.Tensor:
        """Decode the next code frame of every slot.

        codes: [B, 8] int64 (one 12.5 Hz frame) -> pcm [B, 1920] float samples at 24 kHz; ``state`` advances.
        kernels: how the transformer runs (``stream_kernels``), eagerly if None.
        """
        return self.decode_frame_traced(codes, state, kernels).pcm
