"""The model and the sampling settings that the flags of ``flags.py`` ask for."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .console import log


def resolve_model_assets(args: argparse.Namespace, need_voices: bool = True):
    """Where the weights come from: the demo model, local files, or the Hugging Face hub."""
    if args.model == "demo":
        from ..demo import demo_assets

        return demo_assets()
    from ..model_assets import DEFAULT_REPO, resolve_assets

    return resolve_assets(
        args.hf_repo or DEFAULT_REPO, moshi_weight=args.moshi_weight, mimi_weight=args.mimi_weight,
        tokenizer=args.tokenizer, voice_prompt_dir=args.voice_prompt_dir, need_voices=need_voices,
    )


def load_model_for_args(args: argparse.Namespace, assets, *, slots: int = 1, input_frames: list[int] | None = None):
    """Load the model as the model flags ask (device, --quantize, --cpu-offload), after saying what to expect
    on this hardware (real time or not, how long a CPU run takes). ``slots``: conversations run at once."""
    import torch

    from ..deploy.plan import plan_load
    from ..devices import default_device
    from ..loading import load_model, preset_of

    device = args.device or default_device()
    quantize = getattr(args, "quantize", "none")
    offload = getattr(args, "offload_layers", None)
    if offload is not None and not args.cpu_offload:
        raise UsageError("--offload-layers goes with --cpu-offload")
    if torch.device(device).type == "cuda" and getattr(args, "batch_size", None) is None:
        slots = 1  # the memory check asks for one conversation; the batch then grows into what is left
    plan = plan_load(preset_of(assets), device, quantize=quantize, cpu_offload=args.cpu_offload, offload_layers=offload,
                     slots=slots, input_frames=input_frames)
    for message in plan.messages:
        log(message)
    return load_model(assets, plan.device, quantize=plan.quantize, offload_layers=plan.offload_layers)


def sampling_from_args(args: argparse.Namespace):
    """The engine's ``SamplingConfig`` from the flags of ``flags.add_sampling_arguments``."""
    from ..engine import SamplingConfig

    return SamplingConfig(
        text_temperature=args.temp_text, text_top_k=args.topk_text, audio_temperature=args.temp_audio,
        audio_top_k=args.topk_audio, greedy=args.greedy, seed=None if args.seed < 0 else args.seed,
    )
