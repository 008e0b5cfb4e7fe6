"""Slots, joins and the batched frame step that every front end (offline, server, benchmarks) drives.

The engine owns all device state, preallocated for ``max_slots`` conversations: the LM's KV rings and
token buffers, Mimi's encoder and decoder streaming state, and per-slot sampling settings. A
conversation joins a slot with its system prompt, prefilled into that slot only (or copied from the
persona prefix cache); then every ``step`` takes one 80 ms frame of user audio per slot and returns
one frame of agent audio and tokens per slot.

Cost follows use: a step runs only over slots ``0..n-1`` where n is the smallest batch bucket that
holds the highest active slot (new conversations take the lowest free slot), and attention reads only
the part of the KV rings that the longest of those conversations has filled (rounded up to a length
bucket). On CUDA each (batch bucket, length bucket) pair is captured once as a CUDA graph of the
whole frame (Mimi encode, LM step, Mimi decode) and replayed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from .. import startup
from ..errors import UsageError
from ..cuda_graph import CapturedStep
from ..lm.generator import BatchSampling, Generator, GeneratorState
from ..lm.model import LMState
from ..lm.sampling import TokenSampling
from ..persona import SystemPrompt, system_prompt_work
from .kernels import EngineKernels, engine_kernels
from .prefill_graphs import SCRATCH_FRAMES, PrefillGraphs
from .prefix_cache import PrefixCache, restore_snapshot, take_snapshot


log = logging.getLogger("personaplex.engine")


@dataclass(frozen=True)
class SamplingConfig:
    """How one conversation chooses its tokens (reference defaults), in plain numbers: what flags and clients
    set. The engine writes it into its slot of the frame step's ``lm.generator.BatchSampling``."""

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
    """One frame for slots ``0..n-1`` (the batch bucket that ran), on the host."""

    tokens: torch.Tensor  # [n, channels] int64: text, agent codebooks, user codebooks
    pcm: torch.Tensor  # [n, frame_size] float32 agent audio at 24 kHz


MAX_TEXT_TOP_K = 250
MAX_AUDIO_TOP_K = 2048
LENGTH_BUCKET = 256  # frames (20 s): attention reads the rings in multiples of this
# Prompt frames per prefill block when a join is spread over ticks. A block reads every weight once,
# so larger blocks cost less per frame; 256 holds a 10 s voice or a long text prompt in one block.
JOIN_CHUNK_FRAMES = 256
# What a conversation keeps once it is longer than the context (``personaplex.layers.kv_ring``): "sliding"
# forgets the oldest frames, the system prompt first, as the reference; "pin-persona" keeps the system
# prompt and slides over the conversation after it.
CONTEXT_POLICIES = ("sliding", "pin-persona")


@dataclass
class PendingJoin:
    first: int
    stop: int
    prompt: SystemPrompt
    key: tuple
    work: Iterator[int] | None  # None: the prompt's state came from the prefix cache
    in_scratch: bool = False  # prefilled in the CUDA-graph scratch slot, copied in when done
    context_policy: str = "sliding"
    hold: bool = False  # wait for ``Engine.start`` once the prompt is applied


def slot_bytes(lm, mimi, kv_dtype: str = "model") -> int:
    """Device memory one conversation slot takes (KV rings at full context, Mimi state, buffers)."""
    cfg = lm.config
    per_value = 1 if kv_dtype == "fp8" else lm.dtype.itemsize
    kv = 2 * cfg.num_layers * cfg.num_heads * cfg.context * (cfg.head_dim * per_value + (lm.dtype.itemsize if kv_dtype == "fp8" else 0))
    with torch.device("meta"):
        codec = sum(t.numel() * t.element_size() for t in mimi.new_encoder_state(1, "meta").tensors())
        codec += sum(t.numel() * t.element_size() for t in mimi.new_decoder_state(1, "meta").tensors())
    return kv + codec


def slots_that_fit(
    lm, mimi, kv_dtype: str = "model", reserve_bytes: int = 3 << 30, prefix_cache_bytes: int = 2 << 30,
) -> int:
    """How many slots the free device memory holds, keeping ``reserve_bytes`` for activations and graphs,
    room for a full prefix cache and the scratch slot that new personas prefill in (``PrefillGraphs``)."""
    if lm.device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(lm.device)
    per_slot = slot_bytes(lm, mimi, kv_dtype)
    scratch = per_slot * min(SCRATCH_FRAMES, lm.config.context) // lm.config.context
    return max(1, (free - reserve_bytes - prefix_cache_bytes - scratch) // per_slot)


def check_slots_fit(lm, mimi, slots: int, kv_dtype: str = "model") -> None:
    """Refuse, before any state is allocated, a slot count the free device memory cannot hold (a GPU that
    runs out while capturing graphs fails a minute later, with a CUDA traceback)."""
    if lm.device.type != "cuda":
        return
    fit = slots_that_fit(lm, mimi, kv_dtype)
    if slots > fit:
        per_slot = slot_bytes(lm, mimi, kv_dtype) / 2**30
        free = torch.cuda.mem_get_info(lm.device)[0] / 2**30
        hint = "" if kv_dtype == "fp8" else " or use --kv-dtype fp8 (about half the memory a slot)"
        raise UsageError(f"--max-conversations {slots} does not fit the GPU: {free:.1f} GiB are free after the "
                         f"weights and a slot takes {per_slot:.2f} GiB ({kv_dtype} KV rings at full context), which "
                         f"leaves room for {fit} beside the graphs, activations and persona cache. Give at most {fit}"
                         f"{hint}.")


def batch_buckets(max_slots: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_slots (and max_slots itself)."""
    buckets = [b for b in (1, 2, 4) if b < max_slots] + list(range(8, max_slots, 8))
    return buckets + [max_slots]


class Engine:
    def __init__(
        self, lm, mimi, max_slots: int, *, use_cuda_graph: bool | None = None, prefix_cache_bytes: int = 2 << 30,
        kv_dtype: str = "model", kernels: EngineKernels | str = "auto",
    ):
        """kernels: what the steps run (``personaplex.engine.kernels``): a set's name, "auto" (the
        device's default, ``PERSONAPLEX_KERNELS`` first) or an ``EngineKernels``. The models are shared
        and never changed: engines with different kernels may run over the same weights."""
        self.lm, self.mimi = lm, mimi
        self.kernels = kernels if isinstance(kernels, EngineKernels) else engine_kernels(lm, mimi, kernels)
        self.config = lm.config
        self.device = lm.device
        self.max_slots = max_slots
        self.generator = Generator(lm, self.kernels.lm)
        self.gen_state = self.generator.new_state(max_slots)
        self.lm_state = lm.new_state(max_slots, kv_dtype=kv_dtype)
        self.lm_state.pinned = torch.zeros(max_slots, dtype=torch.long, device=self.device)
        self._pinned = [0] * max_slots  # host mirror: steps of slots that slide skip the pinning work
        self.encoder = mimi.new_encoder_state(max_slots, self.device)
        self.decoder = mimi.new_decoder_state(max_slots, self.device)
        self.sampling = BatchSampling(
            text=TokenSampling.fill(max_slots, 0.0, 1, self.device),
            audio=TokenSampling.fill(max_slots, 0.0, 1, self.device),
            seed=torch.zeros(max_slots, dtype=torch.long, device=self.device),
            max_text_top_k=MAX_TEXT_TOP_K,
            max_audio_top_k=MAX_AUDIO_TOP_K,
        )
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.buckets = batch_buckets(max_slots)
        # Host mirrors, so that choosing buckets never waits for the device.
        self.active = [False] * max_slots
        self._active_cache: tuple[tuple, torch.Tensor] | None = None  # see ``_active_on_device``
        self._offsets = [1] * max_slots  # the generator's step counter of each slot
        self._joining: dict[int, PendingJoin] = {}
        self._held: dict[int, PendingJoin] = {}  # persona applied, clock not started (see begin_join's hold)
        self.join_chunk_frames = JOIN_CHUNK_FRAMES
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda" and os.environ.get("PERSONAPLEX_NO_CUDA_GRAPH", "") in ("", "0")
        self._use_cuda_graph = use_cuda_graph
        self._graphs: dict[tuple[int, int], CapturedStep] = {}
        self._side_stream: torch.cuda.Stream | None = None
        self.kv_dtype = kv_dtype
        # New personas prefill in a scratch slot by CUDA graphs, then are copied in (see PrefillGraphs).
        self.scratch_prefill = use_cuda_graph
        self._prefill_graphs: PrefillGraphs | None = None
        self._graph_pool = torch.cuda.graph_pool_handle() if use_cuda_graph else None

    # --- conversations ---------------------------------------------------------------------------

    def free_slots(self) -> list[int]:
        return [slot for slot, busy in enumerate(self.active)
                if not busy and slot not in self._joining and not self._holding(slot)]

    def _holding(self, slot: int) -> bool:
        return any(held.first <= slot < held.stop for held in self._held.values())

    def join(
        self, first: int, stop: int, prompt: SystemPrompt, sampling: SamplingConfig, *, context_policy: str = "sliding",
    ) -> bool:
        """Start conversations in slots ``first..stop-1`` with ``prompt`` now; other slots are untouched.

        Returns True when the persona's state came from the prefix cache (no prefill ran).
        """
        cached = self.begin_join(first, stop, prompt, sampling, chunk_frames=None, context_policy=context_policy)
        while self._joining:
            self.advance_joins(frame_budget=None)
        return cached

    def begin_join(
        self, first: int, stop: int, prompt: SystemPrompt, sampling: SamplingConfig, *, chunk_frames: int | None = -1,
        context_policy: str = "sliding", hold: bool = False,
    ) -> bool:
        """Reserve slots ``first..stop-1`` for a conversation with ``prompt``.

        From the prefix cache the slots are live at once (returns True). Otherwise the prompt's prefill
        is queued and runs in blocks through ``advance_joins``, between the real-time steps of the other
        slots; the slots go live when it is done. ``context_policy``: one of ``CONTEXT_POLICIES``, what
        the conversation keeps once it is longer than the context (the prompt's state is the same).
        ``hold``: once the prompt is applied the slots wait, not stepping and not free, until ``start``
        (a conversation whose clock starts with its caller's first audio); meanwhile they are like a
        join whose last block has run.
        """
        if context_policy not in CONTEXT_POLICIES:
            raise ValueError(f"context policy must be one of {', '.join(CONTEXT_POLICIES)}, got {context_policy!r}")
        if not 0 <= first < stop <= self.max_slots:
            raise ValueError(f"slots {first}..{stop - 1} outside 0..{self.max_slots - 1}")
        if any(self.active[first:stop]) or any(slot in self._joining or self._holding(slot)
                                               for slot in range(first, stop)):
            raise ValueError(f"slots {first}..{stop - 1} are not free")
        cfg = sampling
        if not (1 <= cfg.text_top_k <= MAX_TEXT_TOP_K and 1 <= cfg.audio_top_k <= MAX_AUDIO_TOP_K):
            raise ValueError(f"top-k must be in 1..{MAX_TEXT_TOP_K} (text) and 1..{MAX_AUDIO_TOP_K} (audio)")
        slots = slice(first, stop)
        self.sampling.text.temperature[slots] = 0.0 if cfg.greedy else cfg.text_temperature
        self.sampling.text.top_k[slots] = cfg.text_top_k
        self.sampling.audio.temperature[slots] = 0.0 if cfg.greedy else cfg.audio_temperature
        self.sampling.audio.top_k[slots] = cfg.audio_top_k
        self.sampling.seed[slots] = cfg.resolved_seed()
        key = (prompt.fingerprint(),)
        snapshot = self.prefix_cache.get(key)
        if snapshot is not None:
            with torch.inference_mode():
                restore_snapshot(snapshot, self.gen_state, self.lm_state, first, stop)
            self._prompt_applied(PendingJoin(first, stop, prompt, key, None, context_policy=context_policy, hold=hold))
            return True
        chunk = self.join_chunk_frames if chunk_frames == -1 else chunk_frames
        graphs = self._scratch_prefill(stop - first, prompt.num_steps)
        if graphs is not None:
            work = system_prompt_work(
                self.generator, self.gen_state.slots(first, stop), graphs.scratch, prompt.frames, prompt.saved_voice,
                chunk_frames=graphs.block_frames, temporal=graphs.temporal,
            )
        else:
            work = system_prompt_work(
                self.generator, self.gen_state.slots(first, stop), self.lm_state.slots(first, stop),
                prompt.frames, prompt.saved_voice, chunk_frames=chunk,
            )
        self._joining[first] = PendingJoin(first, stop, prompt, key, work, in_scratch=graphs is not None,
                                           context_policy=context_policy, hold=hold)
        return False

    def _scratch_prefill(self, slots: int, prompt_frames: int) -> PrefillGraphs | None:
        """The CUDA-graph prefill for a one-slot join, when graphs are on, the prompt fits the scratch
        slot and no other join holds it (joins mostly queue behind each other; a second runs in place)."""
        if not self.scratch_prefill or slots != 1 or any(p.in_scratch for p in self._joining.values()):
            return None
        graphs = self._scratch_graphs()
        return graphs if graphs.fits(prompt_frames) else None

    def _scratch_graphs(self) -> PrefillGraphs:
        block = self.join_chunk_frames or JOIN_CHUNK_FRAMES
        if self._prefill_graphs is None or self._prefill_graphs.block_frames != block:
            self._prefill_graphs = PrefillGraphs(
                self.lm, self.kernels.lm, self.kv_dtype, block, graphs=self._use_cuda_graph
            )
        return self._prefill_graphs

    def advance_joins(self, frame_budget: int | None) -> list[int]:
        """Run queued prefill work, at most ``frame_budget`` prompt frames (None: all of it).

        Returns the first slot of each conversation that went live, once the work has run on the device
        (on a GPU the blocks are graph replays that return at once: callers that fit blocks into the
        time a tick leaves must see what they cost).
        """
        done = []
        spent = 0
        with torch.inference_mode():
            for first, pending in list(self._joining.items()):
                while frame_budget is None or spent < frame_budget:
                    frames = next(pending.work, None)
                    if frames is None:
                        positions = pending.prompt.num_steps - 1
                        if pending.in_scratch:
                            snapshot = take_snapshot(self.gen_state, self._prefill_graphs.scratch, first, positions, kv_slot=0)
                            restore_snapshot(snapshot, self.gen_state, self.lm_state, first, pending.stop)
                        else:
                            snapshot = take_snapshot(self.gen_state, self.lm_state, first, positions)
                        self.prefix_cache.put(pending.key, snapshot)
                        del self._joining[first]
                        self._prompt_applied(pending)
                        done.append(first)
                        break
                    spent += frames
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return done

    def warm_up_join(self, prompt: SystemPrompt, chunk_frames: int | None = -1) -> None:
        """Run a join of ``prompt`` in the last free slot the way a live join runs, then leave it.

        The first prefill of a given block shape pays one-time costs (kernel selection, allocator growth)
        of up to a second on a GPU; paying them at start-up keeps them out of the ticks of live
        conversations. The persona also lands in the prefix cache.
        """
        free = self.free_slots()
        if not free:
            return
        slot = free[-1]
        self.begin_join(slot, slot + 1, prompt, SamplingConfig(seed=0), chunk_frames=chunk_frames)
        while slot in self._joining:
            self.advance_joins(frame_budget=None)
        self.leave(slot)

    def _prompt_applied(self, join: PendingJoin) -> None:
        if join.hold:
            self._held[join.first] = join
        else:
            self._go_live(join.first, join.stop, join.prompt, join.context_policy)

    def start(self, first: int) -> None:
        """Start the clock of a held conversation (``begin_join(..., hold=True)``): its slots step from the
        next ``step`` on, exactly as if they had gone live when the prompt was applied."""
        held = self._held.pop(first, None)
        if held is None:
            raise ValueError(f"slot {first} holds no conversation waiting to start")
        self._go_live(held.first, held.stop, held.prompt, held.context_policy)

    def _go_live(self, first: int, stop: int, prompt: SystemPrompt, context_policy: str) -> None:
        pinned = prompt.num_steps if context_policy == "pin-persona" else 0
        self.lm_state.pinned[first:stop] = pinned
        self._pinned[first:stop] = [pinned] * (stop - first)
        mask = torch.zeros(self.max_slots, dtype=torch.bool, device=self.device)
        mask[first:stop] = True
        # Mimi starts fresh with the conversation (the slot's codec state may have idled along).
        self.mimi.reset_encoder_state(self.encoder, mask)
        self.mimi.reset_decoder_state(self.decoder, mask)
        for slot in range(first, stop):
            self.active[slot] = True
            self._offsets[slot] = prompt.num_steps

    def leave(self, slot: int) -> None:
        """End the conversation in ``slot`` (or cancel its pending join); the slot is free again."""
        self.active[slot] = False
        self._offsets[slot] = 1
        self._pinned[slot] = 0
        self.lm_state.pinned[slot] = 0
        for first, pending in list(self._joining.items()):
            if pending.first <= slot < pending.stop:
                del self._joining[first]
        for first, held in list(self._held.items()):
            if held.first <= slot < held.stop:
                del self._held[first]
        # An idle slot keeps stepping with the others (results dropped) and writes only position 0.
        self.gen_state.offset[slot] = 1

    # --- stepping --------------------------------------------------------------------------------

    def _bucket(self) -> tuple[int, int]:
        """(batch bucket, ring length) for the next step."""
        # Joining slots need not step; when they fall inside the bucket their state is put back.
        busy = [slot for slot, live in enumerate(self.active) if live]
        batch = next(b for b in self.buckets if b > max(busy, default=0))
        offset = max((self._offsets[slot] for slot in range(batch) if self.active[slot]), default=1)
        return batch, self.ring_length(offset)

    def ring_length(self, offset: int) -> int:
        """KV ring entries a step reads when the furthest live slot's step counter is ``offset``: all of
        them where each slot reads only its own length, else ``offset`` rounded up to a length bucket."""
        context = self.config.context
        if self.reads_own_lengths():
            return context
        # Live slots write position offset - 1 and read up to it; joining slots' reads are dropped.
        return min(context, -(-offset // LENGTH_BUCKET) * LENGTH_BUCKET) if offset <= context else context

    def reads_own_lengths(self) -> bool:
        """Whether steps skip ring-length buckets: FP8 rings on a GPU, read by the
        Triton decode attention only up to each slot's own length. One CUDA graph per batch bucket then
        serves every length, instead of one per bucket and length (132 for 64 slots: a server start of
        many minutes). bf16 rings keep their buckets: their attention reads the whole bucket, and the
        kernel's split of the ring across the GPU is fixed at capture, tuned to the bucket's length."""
        return self.kv_dtype == "fp8" and self.kernels.lm.reads_own_lengths

    def _pinning(self, batch: int) -> bool:
        """Whether a live slot of the batch pins its persona (its steps then take the pinning path)."""
        return any(self._pinned[slot] and self.active[slot] for slot in range(batch))

    def _frame_fn(self, batch: int, length: int, pinning: bool = False):
        gen_state: GeneratorState = self.gen_state.slots(0, batch)
        lm_state: LMState = self.lm_state.slots(0, batch)
        if not pinning:
            lm_state = lm_state.without_pinning()
        encoder, decoder = self.encoder.slots(0, batch), self.decoder.slots(0, batch)
        sampling = self.sampling.slots(0, batch)
        user = slice(1 + self.config.agent_codebooks, self.config.num_channels)
        agent = slice(1, 1 + self.config.agent_codebooks)

        def frame(pcm: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """User audio [n, 1920] -> (tokens [n, channels], agent audio [n, 1920]), on the device."""
            before = [t.clone() for t in gen_state.tensors()]
            # The user's new frame is encoded beside the temporal transformer (on a second stream on a
            # GPU): the transformer reads the previous frame's tokens, this frame's codes are only
            # stored by the second half of the step.
            with self._beside_main_stream() as join:
                # A broken client's NaN or infinite samples become silence instead of poisoning its slot.
                codes = self.mimi.encode_frame(
                    torch.nan_to_num(pcm, nan=0.0, posinf=0.0, neginf=0.0), encoder, self.kernels.codec
                )
                forced = torch.full((batch, self.config.num_channels), -1, dtype=torch.long, device=pcm.device)
                forced[:, user] = codes
            temporal = self.generator.step_temporal(gen_state, lm_state, used_length=length)
            join(forced)
            # The user's codes are always forced: their depth predictions would be overridden, skip them.
            result = self.generator.step_tokens(
                gen_state, temporal, forced, depth_steps=self.config.agent_codebooks, sampling=sampling
            )
            # Slots that are idle or still joining step too (their results are dropped); their token
            # state is put back. Their one KV write lands on the position the slot writes next (its
            # next prefill block, or 0 when idle), which is rewritten before anyone reads it.
            for tensor, old in zip(gen_state.tensors(), before):
                keep = active.view(-1, *([1] * (tensor.dim() - 1)))
                tensor.copy_(torch.where(keep, tensor, old))
            return result.tokens, self.mimi.decode_frame(result.tokens[:, agent], decoder, self.kernels.codec)

        preserve = gen_state.tensors() + encoder.tensors() + decoder.tensors()
        return frame, preserve

    @contextlib.contextmanager
    def _beside_main_stream(self):
        """Work queued inside runs on a side stream (CUDA) concurrently with what the main stream queues
        next; ``join(*tensors)`` makes the main stream wait for it before using ``tensors``. On a CPU
        everything simply runs in order."""
        if self.device.type != "cuda":
            yield lambda *tensors: None
            return
        main = torch.cuda.current_stream(self.device)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        side = self._side_stream
        side.wait_stream(main)

        def join(*tensors: torch.Tensor) -> None:
            main.wait_stream(side)
            if not torch.cuda.is_current_stream_capturing():  # a graph's memory is its own
                for tensor in tensors:  # allocated on the side stream, used on the main one
                    tensor.record_stream(main)

        with torch.cuda.stream(side):
            yield join

    def length_buckets(self, up_to_frames: int) -> list[int]:
        """Ring lengths the steps of conversations up to ``up_to_frames`` frames long will read."""
        context = self.config.context
        lengths = list(range(LENGTH_BUCKET, min(up_to_frames, context) + LENGTH_BUCKET, LENGTH_BUCKET))
        return sorted({min(length, context) for length in lengths})

    def capture_graphs(self, up_to_frames: int | None = None, *, pinning: bool = False) -> int:
        """Capture the CUDA graphs of every batch bucket and ring length ahead of time, and those of the
        prefill blocks, so that no step of a live conversation or join waits for a capture (~0.5 s each).
        ``pinning``: also those of batches with a pin-persona conversation (otherwise captured at first use).
        Returns how many were captured."""
        if not self._use_cuda_graph:
            return 0
        bucketed = self.length_buckets(up_to_frames or self.config.context)
        captured = 0
        startup.begin(f"capturing the frame step of {len(self.buckets)} batch sizes ({self.kernels.name} kernels)")
        for number, batch in enumerate(self.buckets, 1):
            pcm = torch.zeros(batch, self.mimi.frame_size, device=self.device)
            active = torch.tensor(self.active[:batch], device=self.device)
            times = []
            for length in [self.config.context] if self.reads_own_lengths() else bucketed:
                for key in [(batch, length), (batch, length, "pin")][: 2 if pinning else 1]:
                    if key not in self._graphs:
                        started = time.perf_counter()
                        with torch.inference_mode():
                            self._graphs[key] = self._capture(batch, length, pcm, active, pinning=len(key) == 3)
                        times.append(time.perf_counter() - started)
            if times:  # the first of a batch size may compile; where start-up time goes
                startup.report(
                    f"step graph, batch {batch} ({number}/{len(self.buckets)})", sum(times),
                    f"{len(times)} graphs" if len(times) > 1 else "",
                )
            captured += len(times)
        if self.scratch_prefill:  # and the prefill blocks of new personas
            started = time.perf_counter()
            with torch.inference_mode():
                blocks = self._scratch_graphs().capture_all()
            if blocks:
                startup.report("prefill graphs", time.perf_counter() - started, f"{blocks} graphs")
            captured += blocks
        return captured

    def _capture(
        self, batch: int, length: int, pcm: torch.Tensor, active: torch.Tensor, pinning: bool = False,
    ) -> CapturedStep:
        frame, preserve = self._frame_fn(batch, length, pinning)
        return CapturedStep(frame, {"pcm": pcm, "active": active}, preserve, pool=self._graph_pool)

    def _active_on_device(self, batch: int) -> torch.Tensor:
        """The live flags of slots 0..batch-1 on the device; the last one made is reused while it holds
        (slots join and leave seldom: one host-to-device copy fewer in most steps)."""
        flags = tuple(self.active[:batch])
        if self._active_cache is None or self._active_cache[0] != flags:
            self._active_cache = (flags, torch.tensor(flags, device=self.device))
        return self._active_cache[1]

    def _to_host(self, tokens: torch.Tensor, pcm: torch.Tensor) -> FrameOutput:
        """Both outputs of a frame to the host, in page-locked memory on a GPU: two asynchronous copies and
        one wait, rather than two waits."""
        if self.device.type != "cuda":
            return FrameOutput(tokens.cpu(), pcm.cpu())
        host = FrameOutput(torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True),
                           torch.empty(pcm.shape, dtype=pcm.dtype, pin_memory=True))
        host.tokens.copy_(tokens, non_blocking=True)
        host.pcm.copy_(pcm, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host

    def step(self, pcm: torch.Tensor) -> FrameOutput:
        """One 80 ms frame: pcm [>= n, 1920] user audio (float, 24 kHz) for slots 0..; returns rows 0..n-1."""
        batch, length = self._bucket()
        pinning = self._pinning(batch)
        pcm = pcm[:batch].to(self.device, torch.float32, non_blocking=True)
        active = self._active_on_device(batch)
        with torch.inference_mode():
            if self._use_cuda_graph:
                key = (batch, length) if not pinning else (batch, length, "pin")  # pinning graphs: at first use
                graph = self._graphs.get(key)
                if graph is None:
                    graph = self._graphs[key] = self._capture(batch, length, pcm, active, pinning)
                tokens, out = graph(pcm=pcm, active=active)
            else:
                frame, _ = self._frame_fn(batch, length, pinning)
                tokens, out = frame(pcm, active)
            result = self._to_host(tokens, out.float())
        for slot in range(batch):
            if self.active[slot]:
                self._offsets[slot] += 1
        return result
