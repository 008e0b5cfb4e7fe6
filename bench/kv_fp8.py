"""Effect of FP8 KV rings on the LM's outputs, against rings in the model dtype (bf16 on GPU).

    python bench/kv_fp8.py [--frames 400]

Both runs see identical inputs (every channel teacher-forced with the same random tokens after the same
persona prompt), so differences come from the KV storage alone and cannot cascade. Reported per frame
range: relative L2 error of the text logits, and agreement of the greedy choice (argmax) for the text
token and for the 8 agent audio codebooks. The weights are random (the real ones are gated), so this is
a proxy: random weights have flatter logits than trained ones, which makes argmax flips more likely.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personaplex.config import get_preset  # noqa: E402
from personaplex.lm.generator import Generator  # noqa: E402
from personaplex.loading import load_lm  # noqa: E402
from personaplex.persona import VoicePrompt, apply_system_prompt, build_system_prompt  # noqa: E402
from personaplex.random_weights import write_random_lm_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="personaplex-7b")
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = get_preset(args.preset)
    if not args.checkpoint.exists():
        write_random_lm_checkpoint(preset.lm, args.checkpoint, dtype=dtype, device=device.type)
    lm = load_lm(args.checkpoint, preset.lm, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    voice = VoicePrompt("random", codes=torch.randint(0, 2048, (125, 8), generator=g))
    prompt = build_system_prompt(preset.lm, voice, torch.randint(4, preset.lm.text_card, (60,), generator=g).tolist())
    forced = torch.randint(0, 2048, (args.frames, preset.lm.num_channels), generator=g)
    forced[:, 0] = torch.randint(4, preset.lm.text_card, (args.frames,), generator=g)
    results = {}
    with torch.inference_mode():
        for kv in ("model", "fp8"):
            generator = Generator(lm)
            gen_state, lm_state = generator.new_state(1), lm.new_state(1, kv_dtype=kv)
            apply_system_prompt(generator, gen_state, lm_state, prompt.frames, None)
            text, audio = [], []
            for frame in forced.to(device):
                result = generator.step(
                    gen_state, lm_state, frame[None], depth_steps=preset.lm.agent_codebooks, return_audio_logits=True
                )
                text.append(result.text_logits[0].float().cpu())
                audio.append(result.audio_logits[0].float().argmax(-1).cpu())
            results[kv] = (torch.stack(text), torch.stack(audio))
    (text_ref, audio_ref), (text_fp8, audio_fp8) = results["model"], results["fp8"]
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, preset {preset.name}, model dtype {dtype}, "
          f"prompt {prompt.num_steps} frames then {args.frames} teacher-forced frames")
    print("\n| frames after prompt | text logits rel. L2 error | text argmax agreement | audio argmax agreement (8 codebooks) |")
    print("|---|---|---|---|")
    edges = [0, 50, 100, 200, args.frames]
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo >= args.frames:
            break
        ref, fp8 = text_ref[lo:hi], text_fp8[lo:hi]
        error = ((fp8 - ref).norm() / ref.norm()).item()
        text_agree = (fp8.argmax(-1) == ref.argmax(-1)).float().mean().item()
        audio_agree = (audio_fp8[lo:hi] == audio_ref[lo:hi]).float().mean().item()
        print(f"| {lo}-{hi} | {error:.4f} | {100 * text_agree:.1f}% | {100 * audio_agree:.1f}% |")


if __name__ == "__main__":
    main()
