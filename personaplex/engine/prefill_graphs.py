"""A new persona's prompt prefill as CUDA graphs in a scratch slot, copied into its slot at the end.

Run eagerly, one prefill block of a joining conversation is a few thousand kernel launches whose
host time (35-120 ms on an H100) exceeds what a real-time tick leaves once many conversations are
live; its arithmetic takes a few milliseconds. Replayed as a CUDA graph it costs only that, but a
graph is tied to the addresses it was captured with, and the joining slot differs from join to join.
So the prefill runs in one scratch slot owned here, in blocks padded to a few fixed sizes (64 frames
doubled up to the largest block), and the finished prompt state is copied into the conversation's slot
in one go, exactly as a prefix cache hit is. Large blocks matter: every block reads all the weights
once (~5 ms for the 7B model on an H100), so a prompt in one block costs far less than in four. The
scratch ring holds ``SCRATCH_FRAMES`` positions, not the model's whole context: a prompt never wraps
it (longer prompts prefill in place), so it indexes and masks as the full ring.

Padding is harmless: the padded frames sit after the block's real ones, so no real query attends to
them, and their ring entries lie past the prompt, where the conversation's own frames overwrite them
before any query can see them (nor are they part of the copy).
"""

from __future__ import annotations

import torch

from ..cuda_graph import CapturedStep
from ..lm.fused import StepKernels
from ..lm.generator import PREFILL_READ_ROUNDING
from ..lm.model import LMModel

SCRATCH_FRAMES = 1024  # prompt positions the scratch slot holds (a 60 s voice prompt is 750 frames)
SMALLEST_BLOCK = 64  # padded block sizes are this doubled, up to the largest block


def padded_size(frames: int, largest: int) -> int:
    """The captured block size a block of ``frames`` (<= ``largest``) is padded to."""
    size = min(SMALLEST_BLOCK, largest)
    while size < min(frames, largest):
        size = min(2 * size, largest)
    return size


class PrefillGraphs:
    """Scratch KV rings of one slot and the captured prefill blocks over them, by block size and ring
    length read."""

    def __init__(self, model: LMModel, kernels: StepKernels, kv_dtype: str, block_frames: int, *, graphs: bool = True):
        """kernels: the functions the blocks run (the engine's); graphs=False runs the same padded blocks
        eagerly (CPU tests of everything but the capture)."""
        self.model = model
        self.kernels = kernels
        self.block_frames = block_frames
        self.graphs = graphs
        self.capacity = min(SCRATCH_FRAMES, model.config.context)
        self.scratch = model.new_state(1, kv_dtype=kv_dtype, capacity=self.capacity)
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self._graphs: dict[tuple[int, int], CapturedStep] = {}

    def block_sizes(self) -> list[int]:
        """The padded block sizes blocks of up to ``block_frames`` frames run as."""
        sizes = [padded_size(1, self.block_frames)]
        while sizes[-1] < self.block_frames:
            sizes.append(padded_size(sizes[-1] + 1, self.block_frames))
        return sizes

    def capturable_sizes(self) -> list[int]:
        """The block sizes worth capturing: none when no prompt fits the scratch slot (a short context: every
        join then prefills in place), else those of ``block_sizes``."""
        return self.block_sizes() if self.fits(1) else []

    def capture_all(self) -> int:
        """Capture every block size at every ring length a prompt in the scratch slot can read, so that
        no join of a live server waits for a capture. Returns how many were captured."""
        if not self.graphs:
            return 0
        dim = self.model.config.dim
        lengths = range(PREFILL_READ_ROUNDING, self.capacity + PREFILL_READ_ROUNDING, PREFILL_READ_ROUNDING)
        positions = torch.zeros(1, dtype=torch.long, device=self.scratch.keys.device)
        captured = 0
        for size in self.capturable_sizes():
            x = torch.zeros(1, size, dim, dtype=self.model.dtype, device=positions.device)
            for used_length in sorted({min(length, self.capacity) for length in lengths}):
                if (size, used_length) not in self._graphs:
                    self._graphs[(size, used_length)] = self._capture(x, positions, used_length)
                    captured += 1
        return captured

    def fits(self, prompt_frames: int) -> bool:
        """Whether a prompt of this many frames, its last block padded, stays inside the scratch ring."""
        return prompt_frames + self.block_frames <= self.capacity

    def temporal(self, block: torch.Tensor, positions: torch.Tensor, lm_state, used_length: int | None) -> None:
        """``Generator.prefill``'s temporal transformer call for one block [1, T, dim] at ``positions`` [1]."""
        frames = block.shape[1]
        if lm_state is not self.scratch or frames > self.block_frames:  # not a block of ours: run it as is
            self.model.forward_temporal(
                block, positions, lm_state, heads=False, used_length=used_length, kernels=self.kernels
            )
            return
        used_length = min(used_length or self.capacity, self.capacity)
        padded = torch.nn.functional.pad(block, (0, 0, 0, padded_size(frames, self.block_frames) - frames))
        if not self.graphs:
            self.model.forward_temporal(
                padded, positions, self.scratch, heads=False, used_length=used_length, kernels=self.kernels
            )
            return
        key = (padded.shape[1], used_length)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(padded, positions, used_length)
        graph(x=padded, positions=positions)

    def _capture(self, x: torch.Tensor, positions: torch.Tensor, used_length: int) -> CapturedStep:
        def block(x: torch.Tensor, positions: torch.Tensor) -> None:
            self.model.forward_temporal(
                x, positions, self.scratch, heads=False, used_length=used_length, kernels=self.kernels
            )

        # Nothing to preserve: the warm-up runs write the ring entries the replay rewrites.
        return CapturedStep(block, {"x": x, "positions": positions}, preserve=[], pool=self.pool)
