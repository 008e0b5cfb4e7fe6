"""torch.compile as the "compile" kernel sets use it: whole graphs, dynamic sizes, room for many variants.

Dynamo keeps its compiled variants per code object, not per model: every model, dtype, ring format and
size specialisation (batch 1 versus larger, for one) that runs through the same step function adds a
variant of that one function. Past the limit (8 by default), a ``fullgraph=True`` function does not fall
back to eager code but raises, in the middle of a step. One process holding a bf16 and an FP8 engine, or
tests over several models, reaches 8 quickly, so the limit is raised for these functions' sake.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RECOMPILE_LIMIT = 64


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Allow at least ``limit`` compiled variants per function (never lowers a larger setting)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)


def compile_step_function(fn: Callable) -> Callable:
    """``fn`` compiled whole (no graph breaks) with dynamic sizes (batch buckets and ring lengths vary)."""
    raise_recompile_limit()
    return torch.compile(fn, fullgraph=True, dynamic=True)
