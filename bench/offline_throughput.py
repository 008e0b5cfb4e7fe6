"""Throughput of ``personaplex offline`` on a folder: audio seconds processed per wall-clock second.

    python bench/offline_throughput.py [--files 64] [--seconds 20] [--batch-size N]

Builds everything the tool needs without the gated real assets: the 7B LM with random bf16 weights in
the real layout, a real-size Mimi with random weights, a synthetic SentencePiece tokenizer with the
real vocabulary size (32,000 pieces; ids are meaningless), a voice preset folder, and a folder of
synthetic speech-like inputs. Then runs the real command line on the folder and prints its report.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import save_file  # noqa: E402

from personaplex.config import get_preset  # noqa: E402
from personaplex.demo import VOICE_NAMES, synthesize_voice, wav_bytes  # noqa: E402
from personaplex.offline import main as offline_main  # noqa: E402
from personaplex.random_weights import random_mimi_state_dict, write_random_lm_checkpoint  # noqa: E402


def synthetic_tokenizer(path: Path, vocab_size: int) -> Path:
    """A SentencePiece model with exactly ``vocab_size`` pieces (mostly placeholder symbols)."""
    import sentencepiece

    corpus = ["you enjoy having a good conversation with the customer about the order and the delivery"] * 50
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=[f"<w{i}>" for i in range(vocab_size - 100)], hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="personaplex-7b")
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the tool's own choice (what fits)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    args = parser.parse_args()
    preset = get_preset(args.preset)
    work = Path(tempfile.mkdtemp(prefix="offline_throughput_"))
    if not args.checkpoint.exists():
        write_random_lm_checkpoint(preset.lm, args.checkpoint, dtype=torch.bfloat16, device=args.device)
    mimi_path = work / "mimi.safetensors"
    save_file(random_mimi_state_dict(preset.mimi), str(mimi_path))
    tokenizer = synthetic_tokenizer(work / "tokenizer.model", preset.lm.text_card)
    voices = work / "voices"
    voices.mkdir()
    (voices / "NATF2.wav").write_bytes(wav_bytes(synthesize_voice("NATF2", seconds=10.0)))
    inputs = work / "inputs"
    inputs.mkdir()
    for index in range(args.files):
        parts = [synthesize_voice(VOICE_NAMES[(index + k) % len(VOICE_NAMES)]) for k in range(int(args.seconds // 3) + 1)]
        audio = np.concatenate(parts)[: int(args.seconds * 24_000)]
        (inputs / f"call{index:03d}.wav").write_bytes(wav_bytes(audio))
    command = [
        "--input-dir", str(inputs), "--output-dir", str(work / "outputs"),
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
        "--moshi-weight", str(args.checkpoint), "--mimi-weight", str(mimi_path), "--tokenizer", str(tokenizer),
        "--voice-prompt-dir", str(voices), "--voice-prompt", "NATF2", "--device", args.device, "--seed", "1",
    ]
    print(f"{args.files} files x {args.seconds:.0f} s; personaplex offline {' '.join(command)}")
    t0 = time.perf_counter()
    code = offline_main(command)
    print(f"exit {code}; whole command including model load: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
