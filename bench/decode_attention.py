"""One layer's decode attention over the KV rings: the Triton split-K kernel against the alternatives.

For each (conversations, ring length, ring dtype) it times one attention call of the 7B shape (32 heads
of 128) and reports the bandwidth it reaches reading the rings; multiply by 32 layers for a step.
Compared: ``decode_attention`` (Triton), scaled-dot-product attention over the bf16 ring (what bf16
rings used before), and the torch.compile'd ``fp8_ring_attention`` (what FP8 rings used before).

    python bench/decode_attention.py                      # on a CUDA machine
    python bench/decode_attention.py --slots 1 64 --lengths 3000
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from personaplex.layers.decode_attention import decode_attention, split_count
from personaplex.layers.kv_ring import quantize_fp8, ring_positions, ring_visibility
from personaplex.lm.fused import fp8_ring_attention


def time_ms(fn, repeats: int, per_graph: int = 10) -> float:
    """Device time of one call, replayed from a CUDA graph as the engine runs it (no launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (repeats * per_graph)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 3000])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    compiled_fp8 = torch.compile(fp8_ring_attention, fullgraph=True, dynamic=True)
    heads, dim = args.heads, args.head_dim
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; one layer, {heads} heads x {dim}; "
          "every slot's ring filled to the length (the worst case)")
    print("| slots | ring length | rings | splits | Triton us | GB/s | before us (kernel) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for slots in args.slots:
            for row in compare(slots, length, heads, dim, args.repeats, compiled_fp8):
                print(row, flush=True)
            torch.cuda.empty_cache()


def compare(slots: int, length: int, heads: int, dim: int, repeats: int, compiled_fp8) -> list[str]:
    """Table rows for bf16 and FP8 rings of ``slots`` conversations, every ring filled to ``length``."""
    q = torch.randn(slots, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(slots, heads, length, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    last = torch.full((slots,), length - 1, device="cuda")
    mask = ring_visibility(ring_positions(last, length), last[:, None], (last - length + 2)[:, None])
    lengths = torch.full((slots,), length, device="cuda", dtype=torch.int32)
    k8, ks = quantize_fp8(keys)
    v8, vs = quantize_fp8(values)
    cases = {
        "bf16": (
            lambda: decode_attention(q, keys, values, mask, lengths),
            lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), "SDPA", 2 * keys.numel() * 2,
        ),
        "fp8": (
            lambda: decode_attention(q, k8, v8, mask, lengths, ks, vs),
            lambda: compiled_fp8(q, k8, ks, v8, vs, mask), "compiled", 2 * (k8.numel() + ks.numel() * 2),
        ),
    }
    rows = []
    for rings, (triton_call, before_call, before_name, ring_bytes) in cases.items():
        new = time_ms(triton_call, repeats)
        old = time_ms(before_call, repeats)
        rows.append(
            f"| {slots} | {length} | {rings} | {split_count(slots * heads, length)} | {1000 * new:.1f} | "
            f"{ring_bytes / new / 1e6:.0f} | {1000 * old:.1f} ({before_name}) | {old / new:.2f}x |"
        )
    return rows

if __name__ == "__main__":
    main()
