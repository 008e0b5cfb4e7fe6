"""Slots, joins and the batched frame step that every front end (offline, server, benchmarks) drives.

The engine owns all device state, preallocated for ``max_slots`` conversations: the LM's KV rings and
token buffers, Mimi's encoder and decoder streaming state, and per-slot sampling settings. A
conversation joins a contiguous range of slots with its system prompt (prefilled into those slots
only); then every ``step`` takes one 80 ms frame of user audio per slot and returns one frame of
agent audio and tokens per slot. On CUDA the whole frame (Mimi encode, LM step, Mimi decode) is
captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..cuda_graph import CapturedStep
from ..lm.generator import Generator, SamplingSettings
from ..lm.sampling import SamplingParams
from ..persona import SystemPrompt, apply_system_prompt


@dataclass(frozen=True)
class SamplingConfig:
    """How one conversation chooses its tokens (reference defaults)."""

    text_temperature: float = 0.7
    text_top_k: int = 25
    audio_temperature: float = 0.8
    audio_top_k: int = 250
    greedy: bool = False
    seed: int | None = None  # None: a fresh random seed

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")


@dataclass
class FrameOutput:
    """One frame for every slot, on the host."""

    tokens: torch.Tensor  # [B, channels] int64: text, agent codebooks, user codebooks
    pcm: torch.Tensor  # [B, frame_size] float32 agent audio at 24 kHz


MAX_TEXT_TOP_K = 250
MAX_AUDIO_TOP_K = 2048


class Engine:
    def __init__(self, lm, mimi, max_slots: int, *, use_cuda_graph: bool | None = None):
        self.lm, self.mimi = lm, mimi
        self.config = lm.config
        self.device = lm.device
        self.max_slots = max_slots
        self.generator = Generator(lm)
        self.gen_state = self.generator.new_state(max_slots)
        self.lm_state = lm.new_state(max_slots)
        self.encoder = mimi.new_encoder_state(max_slots, self.device)
        self.decoder = mimi.new_decoder_state(max_slots, self.device)
        self.sampling = SamplingSettings(
            text=SamplingParams.fill(max_slots, 0.0, 1, self.device),
            audio=SamplingParams.fill(max_slots, 0.0, 1, self.device),
            seed=torch.zeros(max_slots, dtype=torch.long, device=self.device),
            max_text_top_k=MAX_TEXT_TOP_K,
            max_audio_top_k=MAX_AUDIO_TOP_K,
        )
        self._user_channels = slice(1 + self.config.agent_codebooks, self.config.num_channels)
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda" and os.environ.get("PERSONAPLEX_NO_CUDA_GRAPH", "") in ("", "0")
        self._captured: CapturedStep | None = None
        self._use_cuda_graph = use_cuda_graph

    # --- joining ---------------------------------------------------------------------------------

    def join(self, first: int, stop: int, prompt: SystemPrompt, sampling: SamplingConfig) -> None:
        """Start conversations in slots ``first..stop-1`` with ``prompt``; other slots are untouched."""
        if not 0 <= first < stop <= self.max_slots:
            raise ValueError(f"slots {first}..{stop - 1} outside 0..{self.max_slots - 1}")
        cfg = sampling
        slots = slice(first, stop)
        if cfg.text_top_k > MAX_TEXT_TOP_K or cfg.audio_top_k > MAX_AUDIO_TOP_K or min(cfg.text_top_k, cfg.audio_top_k) < 1:
            raise ValueError(f"top-k must be in 1..{MAX_TEXT_TOP_K} (text) and 1..{MAX_AUDIO_TOP_K} (audio)")
        self.sampling.text.temperature[slots] = 0.0 if cfg.greedy else cfg.text_temperature
        self.sampling.text.top_k[slots] = cfg.text_top_k
        self.sampling.audio.temperature[slots] = 0.0 if cfg.greedy else cfg.audio_temperature
        self.sampling.audio.top_k[slots] = cfg.audio_top_k
        self.sampling.seed[slots] = cfg.resolved_seed()
        mask = torch.zeros(self.max_slots, dtype=torch.bool, device=self.device)
        mask[slots] = True
        self.mimi.reset_encoder_state(self.encoder, mask)
        self.mimi.reset_decoder_state(self.decoder, mask)
        with torch.inference_mode():
            apply_system_prompt(
                self.generator, self.gen_state.slots(first, stop), self.lm_state.slots(first, stop),
                prompt.frames, prompt.saved_voice,
            )

    # --- stepping --------------------------------------------------------------------------------

    def _frame(self, pcm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User audio [B, 1920] -> (tokens [B, channels], agent audio [B, 1920]), all on the device."""
        codes = self.mimi.encode_frame(pcm, self.encoder)
        forced = torch.full((pcm.shape[0], self.config.num_channels), -1, dtype=torch.long, device=pcm.device)
        forced[:, self._user_channels] = codes
        result = self.generator.step(self.gen_state, self.lm_state, forced, sampling=self.sampling)
        agent = result.tokens[:, 1 : 1 + self.config.agent_codebooks]
        return result.tokens, self.mimi.decode_frame(agent, self.decoder)

    def step(self, pcm: torch.Tensor) -> FrameOutput:
        """One 80 ms frame for every slot: pcm [max_slots, 1920] user audio (float, 24 kHz)."""
        pcm = pcm.to(self.device, torch.float32, non_blocking=True)
        with torch.inference_mode():
            if self._use_cuda_graph:
                if self._captured is None:
                    preserve = self.gen_state.tensors() + self.encoder.tensors() + self.decoder.tensors()
                    self._captured = CapturedStep(self._frame, {"pcm": pcm}, preserve)
                tokens, out = self._captured(pcm=pcm)
            else:
                tokens, out = self._frame(pcm)
            return FrameOutput(tokens.cpu(), out.float().cpu())
