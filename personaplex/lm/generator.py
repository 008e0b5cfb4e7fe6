"""Frame-by-frame generation with per-channel delays: the reference ``LMGen.step`` semantics.

Each slot keeps a small circular token buffer (``cache``, ``max_delay + 3`` frames: 4 for PersonaPlex)
with flags saying which entries the caller forced (``provided``), and an ``offset`` counting its steps
since reset. A step writes the caller's tokens at their delayed positions, runs the model on the
previous column, fills the free channels of the current column with chosen tokens, and returns the
frame that is complete (each channel read at its own delay, ``max_delay`` frames back). The first
``1 + max_delay`` steps return nothing.

All slots of a batch step together, each at its own offset; nothing here loops over slots or
synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused import StepKernels, step_kernels
from .model import LMModel, LMState
from .sampling import TokenSampling
from .token_buffer import cache_columns, column_index, prefill_block

PREFILL_READ_ROUNDING = 256  # a prefill block reads the ring up to its last position rounded up to this


@dataclass
class GeneratorState:
    """Token buffers of a batch of slots: cache/provided [B, channels, max_delay + 3], offset [B]."""

    cache: torch.Tensor  # int64
    provided: torch.Tensor  # bool
    offset: torch.Tensor  # int64, steps taken since reset

    @property
    def batch_size(self) -> int:
        return self.cache.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor (e.g. to snapshot around CUDA graph warm-up)."""
        return [self.cache, self.provided, self.offset]

    def slots(self, first: int, stop: int) -> "GeneratorState":
        """A view of slots ``first..stop-1``: writes through it change this state."""
        return GeneratorState(self.cache[first:stop], self.provided[first:stop], self.offset[first:stop])


@dataclass
class StepResult:
    """What one step produced for every slot of the batch."""

    tokens: torch.Tensor  # [B, channels] the completed frame; -1 where not ``valid``
    valid: torch.Tensor  # [B] bool: False during the first 1 + max_delay steps of a slot
    text_logits: torch.Tensor  # [B, text_card] float
    audio_logits: torch.Tensor | None  # [B, depth steps, card] when requested
    transformer_out: torch.Tensor  # [B, dim]


@dataclass
class TemporalOutput:
    """The temporal transformer's part of a step (``Generator.step_temporal``)."""

    counter: torch.Tensor  # [B] the slots' step counters (offsets) before the step
    transformer_out: torch.Tensor  # [B, dim]
    text_logits: torch.Tensor  # [B, text_card]


@dataclass
class BatchSampling:
    """How a batch of slots samples a frame: text and audio ``TokenSampling`` and the per-slot seeds, as
    tensors on the model's device. None => greedy everywhere. The engine fills it from each conversation's
    ``engine.SamplingConfig``."""

    text: TokenSampling
    audio: TokenSampling
    seed: torch.Tensor  # [B] int64
    max_text_top_k: int = 25
    max_audio_top_k: int = 250

    def slots(self, first: int, stop: int) -> "BatchSampling":
        """A view of slots ``first..stop-1``."""
        def part(p: TokenSampling) -> TokenSampling:
            return TokenSampling(p.temperature[first:stop], p.top_k[first:stop])

        return BatchSampling(part(self.text), part(self.audio), self.seed[first:stop], self.max_text_top_k, self.max_audio_top_k)


class Generator:
    """Steps a batch of conversations through an ``LMModel`` with a given kernel set.

    kernels: the functions every step and prefill runs (``personaplex.lm.fused.step_kernels``); the
    eager ones when None. Two generators over one model may use different sets side by side.
    """

    def __init__(self, model: LMModel, kernels: StepKernels | None = None):
        self.model = model
        self.kernels = kernels or step_kernels(model)
        cfg = model.config
        self.config = cfg
        device = model.device
        self.delays = torch.tensor(cfg.delays, device=device)
        self.initial = torch.tensor(
            [cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q, device=device, dtype=torch.long
        )
        self._per_device = {self.delays.device: (self.delays, self.initial)}

    def new_state(self, batch_size: int, device: torch.device | str | None = None) -> GeneratorState:
        """Buffers for ``batch_size`` slots, each as after ``reset`` (offset 1, see ``reset``)."""
        channels, columns = self.config.num_channels, cache_columns(self.config.max_delay)
        device = self.model.device if device is None else torch.device(device)
        state = GeneratorState(
            cache=torch.zeros(batch_size, channels, columns, dtype=torch.long, device=device),
            provided=torch.zeros(batch_size, channels, columns, dtype=torch.bool, device=device),
            offset=torch.zeros(batch_size, dtype=torch.long, device=device),
        )
        self.reset(state, torch.ones(batch_size, dtype=torch.bool, device=device))
        return state

    def reset(self, state: GeneratorState, slots: torch.Tensor, forced: torch.Tensor | None = None) -> None:
        """Restart the given slots (bool mask [B]) as the reference's reset followed by its step 0.

        The reference's first step after a reset runs no model and overwrites everything it was given
        with initial tokens, so it is folded into the reset. ``forced`` [B, channels] (-1 = not given)
        only marks the delayed channels as provided at their delay's column ahead, as that step did; those
        values are overwritten by initial tokens when the slot's counter reaches that column, so they
        never reach the model.
        """
        delays, initial = self._constants(state.cache.device)
        slots = slots.to(device=state.cache.device, dtype=torch.bool)
        keep = ~slots[:, None, None]
        cache = torch.zeros_like(state.cache)
        provided = torch.zeros_like(state.provided)
        cache[:, :, 0] = initial
        provided[:, :, 0] = True
        if forced is not None:
            forced = forced.to(state.cache.device)
            given = (forced >= 0) & (delays > 0)
            ahead = (delays % cache.shape[2])[None, :, None].expand(cache.shape[0], -1, 1)  # [B, K, 1]
            cache.scatter_(2, ahead, torch.where(given, forced, cache.gather(2, ahead)[..., 0])[..., None])
            provided.scatter_(2, ahead, (given | provided.gather(2, ahead)[..., 0])[..., None])
        state.cache.copy_(torch.where(keep, state.cache, cache))
        state.provided.copy_(torch.where(keep, state.provided, provided))
        state.offset.copy_(torch.where(slots, torch.ones_like(state.offset), state.offset))

    def step(
        self,
        state: GeneratorState,
        lm_state: LMState,
        forced: torch.Tensor,
        *,
        depth_steps: int | None = None,
        sampling: BatchSampling | None = None,
        input_embeddings: torch.Tensor | None = None,
        return_audio_logits: bool = False,
        used_length: int | None = None,
    ) -> StepResult:
        """One frame for every slot.

        forced: [B, channels] int64 tokens the caller imposes for this frame (-1 = let the model choose),
        text first, then agent codebooks, then user codebooks. Each is stored at its channel's delay.
        depth_steps: how many audio codebooks the depformer computes, in order; by default all ``dep_q``
        of them (the agent's, then the user's), as the reference does, so that a free user codebook is
        predicted too. Codebooks past ``depth_steps`` must be forced (they are -1 in the frame
        otherwise). A caller that forces every user codebook may pass ``config.agent_codebooks``: the
        result is the same (the user's predictions would be overridden) at half the depth work; the
        engine does.
        input_embeddings: [B, dim] to feed the temporal transformer instead of the embedded tokens
        (replay of saved voice-prompt embeddings).
        used_length: read only the first ``used_length`` KV ring entries; valid while every slot's
        step counter (offset) is at most ``used_length``, i.e. no position beyond it was written.
        """
        temporal = self.step_temporal(state, lm_state, input_embeddings, used_length=used_length)
        return self.step_tokens(
            state, temporal, forced, depth_steps=depth_steps, sampling=sampling, return_audio_logits=return_audio_logits
        )

    def step_temporal(
        self, state: GeneratorState, lm_state: LMState, input_embeddings: torch.Tensor | None = None, *,
        used_length: int | None = None,
    ) -> TemporalOutput:
        """First half of ``step``: the temporal transformer on the previous column.

        It does not depend on this frame's forced tokens (delays are >= 0, so nothing forced now lands in
        the previous column): an engine can encode the user's new audio meanwhile, on another stream,
        and hand the codes to ``step_tokens``. The state is not changed until ``step_tokens``.
        """
        counter = state.offset.clone()
        model_input = self._model_input(state)
        if input_embeddings is None:
            embeddings = self.kernels.embed(model_input[:, None, :])
        else:
            embeddings = input_embeddings[:, None, :].to(self.model.dtype)
        transformer_out, text_logits = self.model.forward_temporal(
            embeddings, counter - 1, lm_state, used_length=used_length, kernels=self.kernels
        )
        return TemporalOutput(counter, transformer_out[:, 0], text_logits[:, 0])

    def step_tokens(
        self, state: GeneratorState, temporal: TemporalOutput, forced: torch.Tensor, *, depth_steps: int | None = None,
        sampling: BatchSampling | None = None, return_audio_logits: bool = False,
    ) -> StepResult:
        """Second half of ``step``: store the forced tokens, choose the free ones, advance."""
        cfg = self.config
        depth_steps = cfg.dep_q if depth_steps is None else depth_steps
        counter, transformer_out, text_logits = temporal.counter, temporal.transformer_out, temporal.text_logits
        kernels = self.kernels
        target, target_forced = self._write_given(state, forced)

        seed = sampling.seed if sampling is not None else None
        choose, forward_depth = kernels.choose_tokens, kernels.forward_depth
        chosen_text = choose(
            text_logits, sampling.text if sampling is not None else None, seed, counter, stream=0,
            max_top_k=sampling.max_text_top_k if sampling is not None else 1,
        )
        text = torch.where(target_forced[:, 0], target[:, 0], chosen_text)
        forced_audio = torch.where(target_forced[:, 1:], target[:, 1:], -1)
        depth = forward_depth(
            transformer_out, text, forced_audio, depth_steps,
            sampling.audio if sampling is not None else None, seed, counter,
            return_logits=return_audio_logits,
            max_top_k=sampling.max_audio_top_k if sampling is not None else 1,
        )
        # Codebooks the depformer skipped must be forced; the forced value stands.
        depth_tokens = torch.cat([depth.tokens, forced_audio[:, depth_steps:]], dim=1)
        chosen = torch.cat([text[:, None], depth_tokens], dim=1)
        tokens, valid = self._commit(state, torch.where(target_forced, target, chosen))
        return StepResult(tokens, valid, text_logits, depth.logits, transformer_out)

    def prefill(
        self,
        state: GeneratorState,
        lm_state: LMState,
        frames: torch.Tensor,
        input_embeddings: torch.Tensor | None = None,
        host_state: GeneratorState | None = None,
        temporal=None,
    ) -> torch.Tensor:
        """Many fully forced frames at once: the same state as ``step`` called once per frame.

        frames: [B, T, channels] with every token given (no -1); input_embeddings: [B, T, dim] to use
        instead of the embedded tokens. Nothing is sampled because nothing would survive: each
        step's target column is entirely forced. That holds when every channel of the step before
        was forced too, or the slots were just reset, which callers (the system prompt) guarantee.
        The token bookkeeping of the whole block is computed at once (``token_buffer.prefill_block``);
        the temporal transformer runs once over the whole block, in chunks that fit its KV ring.
        Outputs are discarded, as when stepping.
        Returns the input embeddings [B, T, dim] that were fed (a voice file stores them).
        host_state: a host copy of ``state`` that the caller keeps in step with it; given, nothing is
        read back from the device (no synchronisation with work in flight, e.g. other slots' steps).
        temporal: runs the temporal transformer over a block of more than two frames instead of
        ``forward_temporal`` (same arguments: block, positions, lm_state, used_length), e.g. a CUDA graph.
        """
        steps = frames.shape[1]
        # A prompt's positions lie inside the context, where both context policies are the same arithmetic.
        lm_state = lm_state.without_pinning()
        # The bookkeeping runs on a host copy of the (small) token state, written back once: on a GPU its
        # tiny ops would cost more in launches than in work.
        host = host_state or GeneratorState(state.cache.cpu(), state.provided.cpu(), state.offset.cpu())
        start = host.offset.clone().to(state.offset.device, non_blocking=True)
        delays, initial = self._constants(host.offset.device)
        inputs = prefill_block(host.cache, host.provided, host.offset, frames.cpu(), delays, initial)
        for tensor, value in zip(state.tensors(), host.tensors()):
            tensor.copy_(value, non_blocking=True)
        if input_embeddings is None:
            embeddings = self.model.embed(inputs.to(self.model.device))
        else:
            embeddings = input_embeddings.to(self.model.dtype)
        chunk = max(1, self.config.context - 1)
        # Ring entries beyond the last position written cannot be visible: read only those before it,
        # rounded up to a multiple of PREFILL_READ_ROUNDING so that the attention shapes (and kernels) recur.
        last_position = int(host.offset.max()) - 1
        used = None
        if last_position < self.config.context:
            used = min(self.config.context, -(-(last_position + 1) // PREFILL_READ_ROUNDING) * PREFILL_READ_ROUNDING)
        for first in range(0, steps, chunk):
            block = embeddings[:, first : first + chunk]
            if block.shape[1] <= 2:
                for t in range(block.shape[1]):  # tiny remainders take the streaming path
                    self.model.forward_temporal(
                        block[:, t : t + 1], start - 1 + first + t, lm_state, heads=False, used_length=used,
                        kernels=self.kernels,
                    )
            elif temporal is not None:
                temporal(block, start - 1 + first, lm_state, used)
            else:
                self.model.forward_temporal(
                    block, start - 1 + first, lm_state, heads=False, used_length=used, kernels=self.kernels
                )
        return embeddings

    def _model_input(self, state: GeneratorState) -> torch.Tensor:
        """The column the temporal transformer reads [B, K]: the previous one. Nothing a step forces lands
        there (delays are >= 0), so it can be read before or after ``_write_given``."""
        return state.cache.gather(2, column_index(state.offset - 1, *state.cache.shape[1:]))[..., 0]

    def _write_given(self, state: GeneratorState, forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the given tokens, apply initial tokens; returns (target column [B, K], its forced flags [B, K])."""
        delays, initial = self._constants(state.offset.device)
        return self.kernels.write_given(state.cache, state.provided, state.offset, forced, delays, initial)

    def _commit(self, state: GeneratorState, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the completed column [B, K], read the frame complete at every delay, advance.
        Returns (tokens [B, K], -1 where not valid; valid [B])."""
        delays, _ = self._constants(state.offset.device)
        return self.kernels.commit(state.cache, state.provided, state.offset, column, delays, self.config.max_delay)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(delays [K], initial tokens [K]) on ``device``: the model's, or host copies for bookkeeping."""
        if device not in self._per_device:
            self._per_device[device] = (self.delays.to(device), self.initial.to(device))
        return self._per_device[device]
