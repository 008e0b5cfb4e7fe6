"""Fidelity of every execution path against float32 eager arithmetic, on the same weights and inputs.

    python bench/fidelity.py                                  # GPU: random 7B weights in the real layout
    python bench/fidelity.py --checkpoint /path/lm.safetensors --steps 400
    python bench/fidelity.py --preset tiny --device cpu --steps 8   # CPU dry run (~30 s of CPU time)

One checkpoint (random bf16 weights in the real layout, written once to ``--checkpoint``, or your own
file) goes through each path: the persona prompt (a random 10 s voice and 60 text tokens), then
``--steps`` frames with every token forced to the same random values (teacher forcing: a difference in
one frame cannot change the inputs of the next). Per path, against the reference path (float32
weights, eager kernels, float32 KV rings, the prompt fed frame by frame as the reference feeds it):

- text logits: relative RMS error (over every frame and entry), and the worst frame's;
- text argmax agreement (frames whose greedy text token equals the reference's);
- audio: relative RMS error of the agent codebooks' depth logits, and their argmax agreement (frames x 8).

Paths (``--paths``, all the device runs by default):

- ``f32-eager``: the reference path again (must give 0 error and 100% agreement: a determinism check);
- ``bf16-eager``: bf16 weights and rings, eager kernels, the prompt frame by frame;
- ``bf16-engine-eager``: the engine with eager kernels: its prompt prefill (whole blocks) and prefix cache;
- ``triton``, ``triton-fp8``, ``compile``, ``compile-fp8``: the engine with that kernel set
  (``personaplex.lm.fused``) and bf16 or FP8 KV rings; on a GPU its prefill runs as CUDA graphs and
  each frame's LM step is replayed as a CUDA graph at the ring length the engine reads, as in serving.
  The engine's own frame also runs Mimi, which is left out: the user's codes are forced directly.

"compile" needs a CUDA device; on a CPU "triton" runs in Triton's interpreter (``TRITON_INTERPRET=1``,
set by this script for ``--device cpu``). Prints one table; ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL_PATHS = ("f32-eager", "bf16-eager", "bf16-engine-eager", "triton", "triton-fp8", "compile", "compile-fp8")
SHARED_7B_CHECKPOINT = Path("/tmp/personaplex_random_lm.safetensors")  # the other benches' 7B file


@dataclass(frozen=True)
class PathSpec:
    """One way of running the model."""

    name: str
    dtype: torch.dtype
    kernels: str  # "eager", "triton" or "compile"
    kv_dtype: str  # "model" or "fp8"
    engine: bool  # through the Engine (prefill, prefix cache, CUDA graphs on a GPU) or a bare Generator

    def describe(self, cuda: bool) -> str:
        dtype = "float32" if self.dtype == torch.float32 else "bf16"
        rings = "FP8" if self.kv_dtype == "fp8" else dtype
        prompt = "prefill" if self.engine else "frame by frame"
        graphs = ", CUDA graphs" if self.engine and cuda else ""
        return f"{self.name}: {dtype} weights, {self.kernels} kernels, {rings} rings, prompt {prompt}{graphs}"


def path_spec(name: str) -> PathSpec:
    if name == "f32-eager":
        return PathSpec(name, torch.float32, "eager", "model", engine=False)
    if name == "bf16-eager":
        return PathSpec(name, torch.bfloat16, "eager", "model", engine=False)
    if name == "bf16-engine-eager":
        return PathSpec(name, torch.bfloat16, "eager", "model", engine=True)
    kernels, _, rings = name.partition("-")
    return PathSpec(name, torch.bfloat16, kernels, "fp8" if rings == "fp8" else "model", engine=True)


@dataclass
class Outputs:
    text_logits: torch.Tensor  # [steps, text_card] float32, on the host
    audio_logits: torch.Tensor  # [steps, agent codebooks, card] float32, on the host


def teacher_forced_inputs(config, steps: int, seed: int = 0):
    """(persona prompt, forced frames [steps, channels]) drawn from ``seed``."""
    from personaplex.persona import PromptTooLongError, VoicePrompt, build_system_prompt

    g = torch.Generator().manual_seed(seed)
    # A 10 s voice and 60 text tokens as in the other benches; a few frames of each for a tiny context.
    voice_frames, text_tokens = min(125, max(2, config.context // 8)), min(60, max(2, config.context // 8))
    voice = VoicePrompt("random", codes=torch.randint(0, config.card, (voice_frames, 8), generator=g))
    text = torch.randint(4, config.text_card, (text_tokens,), generator=g).tolist()
    try:
        prompt = build_system_prompt(config, voice, text)
    except PromptTooLongError:  # the room check made for real conversations; the arithmetic is the same
        prompt = build_system_prompt(dataclasses.replace(config, context=10**6), voice, text)
    forced = torch.randint(0, config.card, (steps, config.num_channels), generator=g)
    forced[:, 0] = torch.randint(4, config.text_card, (steps,), generator=g)
    return prompt, forced


def run_generator(lm, spec: PathSpec, prompt, forced: torch.Tensor) -> Outputs:
    """A bare eager Generator: the prompt frame by frame (the reference's call pattern), then the steps."""
    from personaplex.lm.generator import Generator
    from personaplex.persona import apply_system_prompt

    generator = Generator(lm)
    gen_state, lm_state = generator.new_state(1), lm.new_state(1, kv_dtype=spec.kv_dtype)
    apply_system_prompt(generator, gen_state, lm_state, prompt.frames.to(lm.device), stepwise=True)
    depth = lm.config.agent_codebooks
    text, audio = [], []
    for frame in forced.to(lm.device):
        result = generator.step(gen_state, lm_state, frame[None], depth_steps=depth, return_audio_logits=True)
        text.append(result.text_logits[0].float().cpu())
        audio.append(result.audio_logits[0].float().cpu())
    return Outputs(torch.stack(text), torch.stack(audio))


def run_engine(lm, mimi, spec: PathSpec, prompt, forced: torch.Tensor) -> Outputs:
    """The engine's join (prefill, prefix cache; CUDA graphs on a GPU), then its generator, kernels and
    state stepped with the forced frames: each step as the engine runs it, at the ring length it reads,
    replayed from a CUDA graph on a GPU (one per ring length, as the engine's)."""
    from personaplex.cuda_graph import CapturedStep
    from personaplex.engine import Engine, SamplingConfig

    cuda = lm.device.type == "cuda"
    engine = Engine(lm, mimi, max_slots=1, kv_dtype=spec.kv_dtype, kernels=spec.kernels)
    engine.join(0, 1, prompt, SamplingConfig(greedy=True))
    generator, gen_state = engine.generator, engine.gen_state
    lm_state = engine.lm_state.without_pinning()
    depth = lm.config.agent_codebooks

    def step(frame: torch.Tensor, length: int):
        result = generator.step(
            gen_state, lm_state, frame, depth_steps=depth, sampling=engine.sampling, return_audio_logits=True,
            used_length=length,
        )
        return result.text_logits, result.audio_logits

    graphs: dict[int, CapturedStep] = {}
    frames = forced.to(lm.device)
    offset = prompt.num_steps  # the slot's step counter after the join
    text, audio = [], []
    for frame in frames:
        length = engine.ring_length(offset)
        if cuda:
            if length not in graphs:
                graphs[length] = CapturedStep(
                    lambda frame, length=length: step(frame, length), {"frame": frames[:1]}, gen_state.tensors()
                )
            text_logits, audio_logits = graphs[length](frame=frame[None])
        else:
            text_logits, audio_logits = step(frame[None], length)
        text.append(text_logits[0].float().cpu())
        audio.append(audio_logits[0].float().cpu())
        offset += 1
    return Outputs(torch.stack(text), torch.stack(audio))


def relative_rms(values: torch.Tensor, reference: torch.Tensor) -> float:
    return float((values - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


def compare(outputs: Outputs, reference: Outputs) -> dict:
    """The table's numbers for one path against the reference path."""
    per_frame = (outputs.text_logits - reference.text_logits).pow(2).mean(-1).sqrt() / (
        reference.text_logits.pow(2).mean(-1).sqrt()
    )
    text_agree = outputs.text_logits.argmax(-1) == reference.text_logits.argmax(-1)
    audio_agree = outputs.audio_logits.argmax(-1) == reference.audio_logits.argmax(-1)
    return {
        "text_rel_rms": relative_rms(outputs.text_logits, reference.text_logits),
        "text_rel_rms_worst_frame": float(per_frame.max()),
        "text_argmax_agreement": float(text_agree.float().mean()),
        "text_disagreements": int((~text_agree).sum()),
        "audio_rel_rms": relative_rms(outputs.audio_logits, reference.audio_logits),
        "audio_argmax_agreement": float(audio_agree.float().mean()),
        "audio_disagreements": int((~audio_agree).sum()),
    }


def table(rows: list[dict], steps: int, codebooks: int) -> str:
    lines = [
        "| path | text logits rel. RMS error | worst frame | text argmax agreement | "
        f"audio logits rel. RMS error | audio argmax agreement ({codebooks} codebooks) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['path']} | not run: {row['error']} | | | | |")
            continue
        lines.append(
            f"| {row['path']} | {row['text_rel_rms']:.3g} | {row['text_rel_rms_worst_frame']:.3g} | "
            f"{100 * row['text_argmax_agreement']:.2f}% ({row['text_disagreements']} of {steps} differ) | "
            f"{row['audio_rel_rms']:.3g} | {100 * row['audio_argmax_agreement']:.2f}% "
            f"({row['audio_disagreements']} of {steps * codebooks} differ) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="personaplex-7b", help="layout of the model (personaplex.config presets)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="LM weights; written with random values if absent (default: a file in /tmp per preset)")
    parser.add_argument("--steps", type=int, default=200, help="teacher-forced frames after the prompt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paths", nargs="+", choices=ALL_PATHS, default=None,
                        help="what to compare with float32 eager (default: every path the device runs)")
    parser.add_argument("--seed", type=int, default=0, help="draws the prompt and the forced frames")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        # Triton's kernels run in its interpreter on a CPU; read when Triton is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from personaplex.config import get_preset
    from personaplex.engine.kernels import triton_available
    from personaplex.loading import load_lm
    from personaplex.random_weights import random_mimi, write_random_lm_checkpoint

    preset = get_preset(args.preset)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = (SHARED_7B_CHECKPOINT if preset.name == "personaplex-7b"
                      else Path(f"/tmp/personaplex_random_{preset.name}.safetensors"))
    if not checkpoint.exists():
        started = time.perf_counter()
        write_random_lm_checkpoint(preset.lm, checkpoint, dtype=torch.bfloat16, device=device.type)
        print(f"wrote random checkpoint {checkpoint} in {time.perf_counter() - started:.0f} s", flush=True)
    names = args.paths or [p for p in ALL_PATHS if cuda or not p.startswith("compile")]
    prompt, forced = teacher_forced_inputs(preset.lm, args.steps, args.seed)
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, preset "
          f"{preset.name}, checkpoint {checkpoint}; prompt {prompt.num_steps} frames, then {args.steps} "
          "teacher-forced frames", flush=True)

    def unavailable(spec: PathSpec) -> str | None:
        if spec.kernels != "eager" and not triton_available():
            return "Triton is not installed"
        if spec.kernels == "compile" and not cuda:
            return "the compile kernels need a CUDA device"
        return None

    rows, loaded = [], {}
    mimi = None
    with torch.inference_mode():
        # The reference first, alone on the device (float32 7B weights take ~34 GB).
        lm = load_lm(checkpoint, preset.lm, device=device, dtype=torch.float32)
        started = time.perf_counter()
        reference = run_generator(lm, path_spec("f32-eager"), prompt, forced)
        print(f"reference (float32 eager) in {time.perf_counter() - started:.1f} s", flush=True)
        loaded[torch.float32] = lm
        for name in names:
            spec = path_spec(name)
            problem = unavailable(spec)
            if problem:
                rows.append({"path": name, "error": problem})
                print(f"{name}: not run ({problem})", flush=True)
                continue
            if spec.dtype not in loaded:
                lm = None
                loaded.clear()  # one model on the device at a time
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                loaded[spec.dtype] = load_lm(checkpoint, preset.lm, device=device, dtype=spec.dtype)
            lm = loaded[spec.dtype]
            started = time.perf_counter()
            try:
                if spec.engine:
                    mimi = mimi or random_mimi(preset.mimi, device)
                    outputs = run_engine(lm, mimi, spec, prompt, forced)
                else:
                    outputs = run_generator(lm, spec, prompt, forced)
            except Exception as exc:  # one path failing must not hide the others' numbers
                rows.append({"path": name, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{name}: failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            rows.append({"path": name, "description": spec.describe(cuda), **compare(outputs, reference)})
            # Each path's numbers as soon as they exist: a run cut short still reports what it measured.
            print(f"{name} in {time.perf_counter() - started:.1f} s: {json.dumps(rows[-1])}", flush=True)

    codebooks = preset.lm.agent_codebooks
    print("\nReference: float32 weights, eager kernels, float32 KV rings, prompt frame by frame.")
    for row in rows:
        if "description" in row:
            print(f"- {row['description']}")
    print()
    print(table(rows, args.steps, codebooks), flush=True)
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": settings, "prompt_frames": prompt.num_steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
