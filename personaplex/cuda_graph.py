"""Replaying a step function as a CUDA graph: one launch instead of thousands.

The step functions of this package keep all state in caller-owned tensors mutated in place and never
synchronise with the host, so they can be captured as they are: the graph records the kernels with
the addresses of the state tensors, and each replay advances the same state. Inputs are copied into
static buffers before a replay; outputs are the tensors the capture produced, overwritten each time.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


class CapturedStep:
    """``fn(**inputs)`` captured once, replayed on every call.

    inputs: example tensors (shapes and dtypes are fixed from then on). preserve: every state tensor
    that ``fn`` mutates and that must not be advanced by the warm-up runs made before capture (token
    buffers, counters, convolution tails). Writes that a later real step redoes at the same position
    (KV ring entries) need not be listed.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        inputs: dict[str, torch.Tensor],
        preserve: Sequence[torch.Tensor],
        warmup: int = 2,
        pool: Any = None,
    ):
        self.inputs = {name: tensor.clone() for name, tensor in inputs.items()}
        saved = [tensor.clone() for tensor in preserve]

        def restore() -> None:
            for tensor, copy in zip(preserve, saved):
                tensor.copy_(copy)

        # Warm-up on a side stream, as CUDA graph capture requires (lazy library init, allocator pools).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(**self.inputs)
                restore()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Graphs replayed one after another may share one memory pool (``torch.cuda.graph_pool_handle``).
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(**self.inputs)
        restore()

    def __call__(self, **inputs: torch.Tensor) -> Any:
        for name, tensor in inputs.items():
            self.inputs[name].copy_(tensor, non_blocking=True)
        self.graph.replay()
        return self.outputs
