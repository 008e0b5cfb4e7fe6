"""Full-size model on a GPU: load 7B random bf16 weights from safetensors, then time per-frame steps.

    python bench/lm_7b.py [--preset personaplex-7b] [--steps 200] [--checkpoint /tmp/lm.safetensors]

Writes the random checkpoint first when it does not exist (weights in the exact reference layout),
then reports load time, GPU memory and the frame step time (LM alone, Mimi encode/decode alone, and
the whole frame) as a table. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personaplex.config import get_preset  # noqa: E402
from personaplex.cuda_graph import CapturedStep  # noqa: E402
from personaplex.lm.generator import BatchSampling, Generator  # noqa: E402
from personaplex.lm.sampling import TokenSampling  # noqa: E402
from personaplex.loading import load_lm  # noqa: E402
from personaplex.random_weights import random_mimi, write_random_lm_checkpoint  # noqa: E402


def gib(n_bytes: int) -> float:
    return n_bytes / 2**30


def host_memory() -> str:
    """Anonymous (allocated) vs file-backed (mapped checkpoint) resident memory of this process."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return ", ".join(f"{k} {gib(v):.2f} GiB" for k, v in fields.items())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(fn, steps: int, device: torch.device, warmup: int = 5) -> list[float]:
    """Wall-clock milliseconds per call, synchronised after each (a real-time frame waits for its result)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(1000 * (time.perf_counter() - t0))
    return samples


def count_kernels(fn, device: torch.device) -> int | str:
    if device.type != "cuda":
        return "n/a"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"| {name} | {statistics.median(ordered):.2f} | {p99:.2f} | {statistics.mean(ordered):.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="personaplex-7b")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a quick dry run with a small preset")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --device cpu --preset small for a dry run")
    preset = get_preset(args.preset)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name}, torch {torch.__version__}, preset {preset.name}")
    memory = torch.cuda.memory_allocated if cuda else (lambda: 0)

    if not args.checkpoint.exists():
        t0 = time.perf_counter()
        write_random_lm_checkpoint(preset.lm, args.checkpoint, dtype=torch.bfloat16, device=args.device)
        if cuda:
            torch.cuda.empty_cache()
        print(f"wrote random checkpoint {args.checkpoint} ({gib(args.checkpoint.stat().st_size):.2f} GiB) in {time.perf_counter() - t0:.1f} s")

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = memory()
    t0 = time.perf_counter()
    model = load_lm(args.checkpoint, preset.lm, device=device, dtype=torch.bfloat16, preset_name=preset.name)
    synchronize(device)
    load_s = time.perf_counter() - t0
    weights = memory() - base
    peak_load = (torch.cuda.max_memory_allocated() if cuda else 0) - base
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"LM load: {load_s:.1f} s (file in page cache), weights {gib(weights):.2f} GiB on the device, "
        f"device peak during load {gib(peak_load):.2f} GiB; host: peak RSS {gib(host_peak):.2f} GiB "
        f"(counts the memory-mapped file's pages), now {host_memory()}"
    )

    mimi = random_mimi(preset.mimi, device)

    generator = Generator(model)
    gen_state, lm_state = generator.new_state(1), model.new_state(1)
    enc, dec = mimi.new_encoder_state(1, device), mimi.new_decoder_state(1, device)
    kv = lm_state.keys.numel() * lm_state.keys.element_size() * 2
    print(f"KV rings for one conversation ({preset.lm.context} frames): {gib(kv):.2f} GiB")

    user = torch.full((1, preset.lm.num_channels), -1, device=device)
    user[:, 1 + preset.lm.agent_codebooks :] = torch.randint(0, 2048, (1, preset.lm.agent_codebooks), device=device)
    pcm = 0.1 * torch.randn(1, preset.mimi.frame_size, device=device)
    sampling = BatchSampling(
        text=TokenSampling.fill(1, 0.7, 25, device), audio=TokenSampling.fill(1, 0.8, 250, device),
        seed=torch.tensor([1234], device=device),
    )

    # The user's codes are forced, as in the engine, which then computes only the agent's codebooks.
    depth = preset.lm.agent_codebooks

    def lm_step_greedy():
        return generator.step(gen_state, lm_state, user, depth_steps=depth)

    def lm_step_sampled():
        return generator.step(gen_state, lm_state, user, depth_steps=depth, sampling=sampling)

    agent = slice(1, 1 + preset.lm.agent_codebooks)

    def frame_on_device(pcm_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User audio in -> (17 tokens, agent audio out), all on the device."""
        codes = mimi.encode_frame(pcm_in, enc)
        forced = torch.cat([user[:, :agent.stop], codes], dim=1)
        result = generator.step(gen_state, lm_state, forced, depth_steps=depth, sampling=sampling)
        return result.tokens, mimi.decode_frame(result.tokens[:, agent], dec)

    def full_frame():
        tokens, out = frame_on_device(pcm)
        return tokens.cpu(), out.cpu()  # the one host sync per frame: tokens and audio out

    with torch.inference_mode():
        # No host synchronisation may happen inside a step: make any such call an error.
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        lm_step_sampled()
        codes = mimi.encode_frame(pcm, enc)
        mimi.decode_frame(codes, dec)
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
            print("sync check: LM step and Mimi encode/decode ran under torch.cuda.set_sync_debug_mode('error')")
        print(
            f"kernels per LM step (sampled): {count_kernels(lm_step_sampled, device)}; "
            f"per full frame: {count_kernels(full_frame, device)}"
        )
        table = ["| per frame, batch 1 | p50 ms | p99 ms | mean ms |", "|---|---|---|---|"]
        table.append(summary("LM step, greedy", time_steps(lm_step_greedy, args.steps, device)))
        table.append(summary("LM step, sampled", time_steps(lm_step_sampled, args.steps, device)))
        table.append(summary("Mimi encode", time_steps(lambda: mimi.encode_frame(pcm, enc), args.steps, device)))
        table.append(summary("Mimi decode", time_steps(lambda: mimi.decode_frame(codes, dec), args.steps, device)))
        table.append(summary("whole frame (encode + LM + decode + copy out)", time_steps(full_frame, args.steps, device)))
        if cuda:
            # The same step captured as one CUDA graph (the launch overhead of ~5k kernels disappears).
            state_tensors = gen_state.tensors() + enc.tensors() + dec.tensors()
            t0 = time.perf_counter()
            graphed_lm = CapturedStep(
                lambda forced: generator.step(gen_state, lm_state, forced, depth_steps=depth, sampling=sampling),
                {"forced": user}, gen_state.tensors(),
            )
            graphed_frame = CapturedStep(frame_on_device, {"pcm_in": pcm}, state_tensors)
            print(f"CUDA graph capture of the LM step and of the whole frame: {time.perf_counter() - t0:.1f} s")
            table.append(summary("LM step, sampled, CUDA graph", time_steps(lambda: graphed_lm(forced=user), args.steps, device)))

            def graphed_full_frame():
                tokens, out = graphed_frame(pcm_in=pcm)
                return tokens.cpu(), out.cpu()

            table.append(summary("whole frame, CUDA graph (+ copy out)", time_steps(graphed_full_frame, args.steps, device)))
    if cuda:
        print(f"peak GPU memory overall: {gib(torch.cuda.max_memory_allocated()):.2f} GiB")
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    main()
