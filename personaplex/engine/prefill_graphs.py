"""A new persona's prompt prefill as CUDA graphs in a scratch slot, copied into its slot at the end.

Run eagerly, one prefill block of a joining conversation is a few thousand kernel launches whose
host time (35-120 ms on an H100) exceeds what a real-time tick leaves once many conversations are
live; its arithmetic takes a few milliseconds. Replayed as a CUDA graph it costs only that, but a
graph is tied to the addresses it was captured with, and the joining slot differs from join to join.
So the prefill runs in one scratch slot owned here, in blocks of a fixed size (the last one padded),
and the finished prompt state is copied into the conversation's slot in one go, exactly as a prefix
cache hit is. The scratch ring holds ``SCRATCH_FRAMES`` positions, not the model's whole context: a
prompt never wraps it (longer prompts prefill in place), so it indexes and masks as the full ring.

Padding is harmless: the padded frames sit after the block's real ones, so no real query attends to
them, and their ring entries lie past the prompt, where the conversation's own frames overwrite them
before any query can see them (nor are they part of the copy).
"""

from __future__ import annotations

import torch

from ..cuda_graph import CapturedStep
from ..lm.model import LMModel

SCRATCH_FRAMES = 1024  # prompt positions the scratch slot holds (a 60 s voice prompt is 750 frames)


class PrefillGraphs:
    """Scratch KV rings of one slot and the captured prefill blocks over them, by ring length read."""

    def __init__(self, model: LMModel, kv_dtype: str, block_frames: int, *, graphs: bool = True):
        """graphs=False runs the same padded blocks eagerly (CPU tests of everything but the capture)."""
        self.model = model
        self.block_frames = block_frames
        self.graphs = graphs
        self.capacity = min(SCRATCH_FRAMES, model.config.context)
        self.scratch = model.new_state(1, kv_dtype=kv_dtype, capacity=self.capacity)
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self._graphs: dict[int, CapturedStep] = {}

    def fits(self, prompt_frames: int) -> bool:
        """Whether a prompt of this many frames, its last block padded, stays inside the scratch ring."""
        return prompt_frames + self.block_frames <= self.capacity

    def temporal(self, block: torch.Tensor, positions: torch.Tensor, lm_state, used_length: int | None) -> None:
        """``Generator.prefill``'s temporal transformer call for one block [1, T, dim] at ``positions`` [1]."""
        frames = block.shape[1]
        if lm_state is not self.scratch or frames > self.block_frames:  # not a block of ours: run it as is
            self.model.forward_temporal(block, positions, lm_state, heads=False, used_length=used_length)
            return
        used_length = min(used_length or self.capacity, self.capacity)
        padded = torch.nn.functional.pad(block, (0, 0, 0, self.block_frames - frames))
        if not self.graphs:
            self.model.forward_temporal(padded, positions, self.scratch, heads=False, used_length=used_length)
            return
        graph = self._graphs.get(used_length)
        if graph is None:
            graph = self._graphs[used_length] = self._capture(padded, positions, used_length)
        graph(x=padded, positions=positions)

    def _capture(self, x: torch.Tensor, positions: torch.Tensor, used_length: int) -> CapturedStep:
        def block(x: torch.Tensor, positions: torch.Tensor) -> None:
            self.model.forward_temporal(x, positions, self.scratch, heads=False, used_length=used_length)

        # Nothing to preserve: the warm-up runs write the ring entries the replay rewrites.
        return CapturedStep(block, {"x": x, "positions": positions}, preserve=[], pool=self.pool)
