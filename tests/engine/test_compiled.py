"""The "compile" kernel sets' torch.compile settings: many compiled variants of one step function (several
models, dtypes, ring formats in one process) must not turn into a hard failure in the middle of a step."""

from __future__ import annotations

import pytest
import torch

from personaplex.compiled import RECOMPILE_LIMIT, compile_step_function, raise_recompile_limit

# Ten inputs that each need a variant of their own (a guard on the dtype), more than Dynamo's default 8.
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.complex64)


def doubled(x: torch.Tensor) -> torch.Tensor:
    return x + x


@pytest.fixture
def dynamo_limits():
    """Dynamo's defaults for the test, restored after it (the setting is process-wide)."""
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        torch._dynamo.reset()
        yield torch._dynamo.config
    torch._dynamo.reset()


def run_every_dtype(fn) -> None:
    for dtype in DTYPES:
        assert torch.equal(fn(torch.ones(3, dtype=dtype)), torch.full((3,), 2, dtype=dtype))


def test_past_the_default_limit_a_whole_graph_function_fails(dynamo_limits):
    """The fault the raised limit prevents: the ninth variant of a fullgraph function raises."""
    compiled = torch.compile(doubled, fullgraph=True, dynamic=True, backend="eager")
    with pytest.raises(Exception, match="fullgraph|recompile"):
        run_every_dtype(compiled)


def test_step_functions_compile_ten_variants_of_one_function(dynamo_limits, monkeypatch):
    # The step function's own options with the eager backend: Dynamo's variant bookkeeping is what is
    # tested, with no C++ compiler needed.
    compile_with = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_with(fn, backend="eager", **options))
    run_every_dtype(compile_step_function(doubled))
    assert dynamo_limits.recompile_limit == RECOMPILE_LIMIT


def test_the_limit_is_only_ever_raised(dynamo_limits):
    dynamo_limits.recompile_limit = 500
    raise_recompile_limit()
    assert dynamo_limits.recompile_limit == 500
