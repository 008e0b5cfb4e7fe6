"""Flags shared by the commands: the model's weights and device, sampling, what a long conversation keeps.

Declaring flags imports neither torch nor the model: ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# What a conversation keeps past the model's context: engine.CONTEXT_POLICIES, here without importing torch (--help).
CONTEXT_POLICY_CHOICES = ("sliding", "pin-persona")

DEFAULT_TEXT_PROMPT = (
    "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way."
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose the weights, shared by every command that loads the model."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=["personaplex", "demo"], default="personaplex",
                       help="'personaplex': the real weights (Hugging Face or local files); 'demo': a small built-in "
                            "model with random weights that needs no download (untrained: it babbles)")
    group.add_argument("--hf-repo", default=None, help="Hugging Face repo or local snapshot folder (default nvidia/personaplex-7b-v1)")
    group.add_argument("--moshi-weight", type=Path, help="local LM weights (.safetensors) instead of the hub")
    group.add_argument("--mimi-weight", type=Path, help="local Mimi codec weights (.safetensors) instead of the hub")
    group.add_argument("--tokenizer", type=Path, help="local SentencePiece text tokenizer (.model) instead of the hub")
    group.add_argument("--voice-prompt-dir", type=Path, help="folder of voice presets (NATF2.pt, ...) instead of the hub's voices.tgz")
    group.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available)")
    group.add_argument("--quantize", choices=["none", "int8", "fp8"], default="none",
                       help="store the LM's matmul weights in 8 bits (needs torchao): 'int8' halves the weights' "
                            "memory (7B: 8.1 GiB instead of 15.6), 'fp8' too and uses FP8 matmuls on GPUs that have "
                            "them (compute capability >= 8.9); default none (bf16 on GPU)")
    group.add_argument("--cpu-offload", action="store_true",
                       help="keep the LM layers that do not fit the GPU in host memory and stream them in every frame; "
                            "says up front whether that keeps real time on this machine's host link")
    group.add_argument("--offload-layers", type=int, metavar="N",
                       help="with --cpu-offload: offload exactly the last N of the temporal layers (default: as few as fit)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--seed", type=int, default=-1, help="random seed; -1 picks one (default)")
    group.add_argument("--temp-audio", type=float, default=0.8, help="audio temperature (default 0.8)")
    group.add_argument("--temp-text", type=float, default=0.7, help="text temperature (default 0.7)")
    group.add_argument("--topk-audio", type=int, default=250, help="audio top-k (default 250)")
    group.add_argument("--topk-text", type=int, default=25, help="text top-k (default 25)")
    group.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
