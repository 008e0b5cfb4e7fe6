"""Where a join's prefill block goes: host bookkeeping, embedding, the temporal transformer (graph), the copy.

    python bench/prefill_block.py [--kv fp8] [--kernels eager|triton|compile] [--joins 3]

Builds the 7B LM with random weights directly on the GPU (no checkpoint: the block's cost does not depend
on the values), joins a new persona (10 s voice + 60 text tokens) block by block as the serving hub does,
and for each block reports its wall time (until its work ran on the device), the host time before the
replay returns, and the kernels and kernel time one block launches (torch profiler, last join).
Dry run on a CPU: ``python bench/prefill_block.py --preset tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personaplex.config import get_preset  # noqa: E402
from personaplex.engine import Engine, SamplingConfig  # noqa: E402
from personaplex.lm.model import LMModel  # noqa: E402
from personaplex.persona import VoicePrompt, build_system_prompt  # noqa: E402
from personaplex.random_weights import random_mimi  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="personaplex-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kv", choices=["model", "fp8"], default="fp8")
    parser.add_argument("--kernels", choices=["eager", "triton", "compile"], default="eager")
    parser.add_argument("--block", type=int, default=64, help="prompt frames per prefill block")
    parser.add_argument("--joins", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = get_preset(args.preset)
    t0 = time.perf_counter()
    with torch.device(device):
        lm = LMModel(preset.lm).to(torch.bfloat16 if cuda else torch.float32).eval()
    mimi = random_mimi(preset.mimi, device)
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    engine = Engine(lm, mimi, max_slots=2, kv_dtype=args.kv, kernels=args.kernels)
    engine.join_chunk_frames = args.block

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for join in range(args.joins):
        g = torch.Generator().manual_seed(join)
        voice = VoicePrompt("random", codes=torch.randint(0, 2048, (125, 8), generator=g))
        prompt = build_system_prompt(preset.lm, voice, torch.randint(4, preset.lm.text_card, (60,), generator=g).tolist())
        engine.begin_join(1, 2, prompt, SamplingConfig(seed=0))
        blocks = []
        profile = join == args.joins - 1
        while not engine.active[1]:
            sync()
            began = time.perf_counter()
            if profile and len(blocks) == 1:  # a full block in the middle of the prompt
                activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
                with torch.profiler.profile(activities=[activity]) as prof:
                    engine.advance_joins(frame_budget=1)
                    sync()
                kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
                kernels = [e for e in prof.events() if e.device_type == kind]
                print(f"  one block: {len(kernels)} kernels, {sum(e.device_time for e in kernels) / 1000:.2f} ms kernel time")
                print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=12,
                                                max_name_column_width=50))
            else:
                engine.advance_joins(frame_budget=1)
            sync()
            blocks.append(1000 * (time.perf_counter() - began))
        engine.leave(1)
        print(f"join {join}: {prompt.num_steps} frames in {len(blocks)} blocks of {args.block}: "
              + ", ".join(f"{b:.1f}" for b in blocks) + f" ms (sum {sum(blocks):.1f}, median {statistics.median(blocks):.1f})",
              flush=True)


if __name__ == "__main__":
    main()
