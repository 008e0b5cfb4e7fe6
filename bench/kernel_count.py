"""Work one engine frame launches, counted on a CPU: PyTorch operators that run a device kernel, plus
Triton kernel launches, by part of the frame, for each kernel set.

    python bench/kernel_count.py [--preset demo] [--sets eager triton] [--slots 1] [--kv model]

A proxy for the GPU's kernels per frame (what bounds a one-conversation step when nothing is
compiled): every ATen operator that computes (views, reshapes and allocations excluded) is counted as
one kernel, every Triton launch as one. On a CPU some operators decompose where CUDA has one fused
kernel (``rms_norm``, attention), so the absolute figures run higher than a GPU profile; the
difference between the sets is the point. Triton kernels run in Triton's interpreter here.
Parts are run on their own, on the engine's own state, as ``bench/engine.py --profile`` runs them on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personaplex.config import get_preset  # noqa: E402
from personaplex.engine import Engine, SamplingConfig  # noqa: E402
from personaplex.lm.model import LMModel  # noqa: E402
from personaplex.random_weights import random_mimi, randomize_  # noqa: E402
from engine_timing import parts_of_a_frame  # noqa: E402

# Operators that launch nothing: allocations, metadata, host reads.
NO_KERNEL = {
    "aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default", "aten.new_empty.default",
    "aten.new_empty_strided.default", "aten.detach.default", "aten.lift_fresh.default",
    "aten._local_scalar_dense.default",
    "aten.set_.source_Storage_storage_offset", "aten.resize_.default", "aten.is_nonzero.default",
    "aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default", "aten.sym_storage_offset.default",
}


class OperatorCount(TorchDispatchMode):
    """Counts ATen operators that compute (not views, allocations or metadata), by name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not func.is_view and str(func) not in NO_KERNEL:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_triton(count: OperatorCount):
    """Counts every launch of the project's Triton kernels (as ``triton:<name>``); the interpreter's own
    tensor work inside a launch is not counted."""
    from personaplex.layers import decode_attention, fused_ops
    from personaplex.lm import sampling_kernel

    kernels = [(module, name) for module in (decode_attention, fused_ops, sampling_kernel) for name in dir(module)
               if name.startswith("_") and name.endswith("_kernel") and hasattr(getattr(module, name), "run")]
    originals = []
    for module, name in kernels:
        kernel = getattr(module, name)
        original = kernel.run

        def run(*args, _name=name, _original=original, **kwargs):
            count.ops[f"triton:{_name}"] += 1
            count.paused += 1
            try:
                return _original(*args, **kwargs)
            finally:
                count.paused -= 1

        kernel.run = run
        originals.append((kernel, original))
    try:
        yield
    finally:
        for kernel, original in originals:
            kernel.run = original


def count(run) -> Counter:
    counter = OperatorCount()
    with torch.inference_mode(), counting_triton(counter), counter:
        run()
    return counter.ops


def build_engine(preset: str, kernels: str, slots: int, kv: str) -> Engine:
    config = get_preset(preset)
    lm = randomize_(LMModel(config.lm), seed=1).eval().requires_grad_(False)
    mimi = random_mimi(config.mimi, seed=2).eval().requires_grad_(False)
    engine = Engine(lm, mimi, max_slots=slots, kv_dtype=kv, kernels=kernels)
    from personaplex.persona import VoicePrompt, build_system_prompt

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, config.lm.card, (config.lm.dep_q // 2, 8), generator=generator)
    voice = VoicePrompt("random", codes=codes)
    prompt = build_system_prompt(config.lm, voice, [5, 6, 7, 8])
    for slot in range(slots):
        engine.join(slot, slot + 1, prompt, SamplingConfig(seed=slot))
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--sets", nargs="+", default=["eager", "triton"])
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--kv", default="model", choices=["model", "fp8"])
    parser.add_argument("--top", type=int, default=0,
                        help="also list the N most frequent operators of each set's frame")
    args = parser.parse_args()
    table: dict = {}
    frames: dict = {}
    for name in args.sets:
        engine = build_engine(args.preset, name, args.slots, args.kv)
        for _ in range(3):
            engine.step(torch.zeros(args.slots, 1920))
        for part, run in parts_of_a_frame(engine).items():
            run()  # once before counting (first calls may set things up)
            ops = count(run)
            launched = sum(v for k, v in ops.items() if k.startswith("triton:"))
            table.setdefault(part, {})[name] = (sum(ops.values()), launched)
            frames[name] = ops
    print(f"kernels per frame, {args.preset}, {args.slots} conversation(s), {args.kv} rings "
          "(CPU count of computing ATen operators + Triton launches; a proxy for GPU kernels)")
    header = f"{'part':<40}" + "".join(f"{name:>22}" for name in args.sets)
    print(header)
    for part, counts in table.items():
        cells = "".join(f"{f'{counts[n][0]} ({counts[n][1]} Triton)':>22}" for n in args.sets)
        print(f"{part:<40}{cells}")
    for name in args.sets if args.top else ():
        print(f"\n{name}: most frequent operators of a whole frame")
        for op, n in frames[name].most_common(args.top):
            print(f"  {n:6d}  {op}")


if __name__ == "__main__":
    main()
