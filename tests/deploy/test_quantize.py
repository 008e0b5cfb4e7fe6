"""Weight quantization (int8, fp8) of the LM through torchao: what is quantized, how close the outputs
stay to the unquantized model, loading without a full-precision copy, and the quantized model in the
engine's code paths (module step, fused step, CUDA graphs where a GPU exists)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from personaplex.config import TINY_LM, get_preset
from personaplex.loading import load_lm
from personaplex.deploy.quantize import (
    QuantizationError,
    check_mode,
    is_quantized,
    matmul_weight_names,
    model_units,
    summarize,
    tensor_bytes,
)
from personaplex.lm.generator import Generator
from personaplex.random_weights import write_random_lm_checkpoint

pytest.importorskip("torchao")

# Tiny, but with every width a multiple of 16 (fp8 kernels decline other shapes) and 3 layers.
CONFIG = dataclasses.replace(TINY_LM, num_layers=3, hidden_scale=4.5, depformer_dim_feedforward=96, context=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_lm_checkpoint(CONFIG, tmp_path_factory.mktemp("lm") / "lm.safetensors", seed=3)


def teacher_forced(
    model, frames: int = 10, slots: int = 2, kernels: str = "eager",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text logits [frames, slots, text_card], audio logits [frames, slots, 8, card]) with every token
    forced to the same random values, so that differences cannot cascade from one frame to the next."""
    from personaplex.lm.fused import step_kernels

    cfg = model.config
    generator = Generator(model, step_kernels(model, kernels))
    gen_state, lm_state = generator.new_state(slots), model.new_state(slots)
    draw = torch.Generator().manual_seed(7)
    text, audio = [], []
    with torch.inference_mode():
        for _ in range(frames):
            forced = torch.randint(0, cfg.card, (slots, cfg.num_channels), generator=draw)
            forced[:, 0] = torch.randint(0, cfg.text_card, (slots,), generator=draw)
            result = generator.step(gen_state, lm_state, forced.to(model.device), return_audio_logits=True)
            text.append(result.text_logits.float().cpu())
            audio.append(result.audio_logits.float().cpu())
    return torch.stack(text), torch.stack(audio)


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    return ((found - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_every_matmul_weight_is_quantized_and_nothing_else(checkpoint, mode):
    model = load_lm(checkpoint, CONFIG, dtype=torch.float32, quantize=mode)
    matmul = set(matmul_weight_names(model))
    # The depformer's per-codebook stacks and the fused attention projections are among them.
    assert "depformer.layers.0.self_attn.in_proj_weight" in matmul
    assert "transformer.layers.2.self_attn.in_proj_weight" in matmul
    for name, param in model.named_parameters():
        assert is_quantized(param) == (name in matmul), name
    summary = summarize(model)
    assert summary.declined == []
    plain = load_lm(checkpoint, CONFIG, dtype=torch.float32)
    quantized_values = sum(p.numel() for n, p in plain.named_parameters() if n in matmul)
    assert summary.quantized_values == quantized_values
    # One byte per quantized value plus per-row scales, instead of four (float32).
    quantized_bytes = sum(tensor_bytes(p) for p in model.parameters() if is_quantized(p))
    assert quantized_values < quantized_bytes < 2 * quantized_values  # rows of 16-96 values: scales weigh in
    assert summary.total_bytes == sum(tensor_bytes(p) for p in model.parameters())


@pytest.mark.parametrize("mode,tolerance", [("int8", 0.02), ("fp8", 0.08)])
def test_logits_stay_close_to_the_unquantized_model(checkpoint, mode, tolerance):
    text_ref, audio_ref = teacher_forced(load_lm(checkpoint, CONFIG, dtype=torch.float32))
    text, audio = teacher_forced(load_lm(checkpoint, CONFIG, dtype=torch.float32, quantize=mode))
    assert 0 < relative_error(text, text_ref) < tolerance
    assert 0 < relative_error(audio, audio_ref) < tolerance
    assert (text.argmax(-1) == text_ref.argmax(-1)).float().mean() > 0.8


def test_triton_kernels_take_quantized_weights(checkpoint):
    """The "triton" kernel set steps a quantized model as the eager set does (on a GPU where there is one,
    else in Triton's interpreter: real Triton launches only take GPU tensors)."""
    from conftest import require_triton_kernels

    require_triton_kernels()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_lm(checkpoint, CONFIG, device=device, dtype=torch.float32, quantize="int8")
    frames = 3  # in Triton's interpreter a frame takes seconds; every kernel runs in each
    text, audio = teacher_forced(model, frames)
    text_fused, audio_fused = teacher_forced(model, frames, kernels="triton")
    torch.testing.assert_close(text_fused, text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(audio_fused, audio, rtol=1e-5, atol=1e-5)


def test_loading_quantizes_unit_by_unit_without_a_full_precision_copy(checkpoint):
    """After each unit (a layer or a small part) is read, the loaded weights are the quantized ones so far:
    the full-precision model never exists in memory."""
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)

    original = torch.nn.Module.load_state_dict
    sizes = []

    def recording_load_state_dict(self, state_dict, *args, **kwargs):
        sizes.append(sum(t.numel() * t.element_size() for t in state_dict.values()))
        return original(self, state_dict, *args, **kwargs)

    torch.nn.Module.load_state_dict = recording_load_state_dict
    try:
        model = load_lm(checkpoint, CONFIG, dtype=torch.float32, quantize="int8", progress=progress)
    finally:
        torch.nn.Module.load_state_dict = original
    units = model_units(model)
    assert seen == list(range(1, len(units) + 1))
    full = sum(p.numel() * 4 for p in load_lm(checkpoint, CONFIG, dtype=torch.float32).parameters())
    # Each read holds one unit (here the largest are the embedding tables), never the whole model.
    assert len(sizes) == len(units) and sum(sizes) == full and max(sizes) < full / 2


def test_quantized_model_runs_in_the_engine(checkpoint):
    from personaplex.checkpoint import build_mimi
    from personaplex.config import get_preset as preset
    from personaplex.engine import Engine, SamplingConfig
    from personaplex.persona import VoicePrompt, build_system_prompt
    from personaplex.random_weights import random_mimi_state_dict

    mimi_config = preset("tiny").mimi
    mimi = build_mimi(mimi_config, "cpu")
    mimi.load_state_dict(random_mimi_state_dict(mimi_config), strict=True)
    mimi = mimi.eval().requires_grad_(False)
    lm = load_lm(checkpoint, dataclasses.replace(CONFIG), dtype=torch.float32, quantize="int8")
    long_context = dataclasses.replace(CONFIG, context=3000)  # the prompt-length guard wants room for a prompt
    voice = VoicePrompt("random", codes=torch.randint(0, 2048, (6, 8), generator=torch.Generator().manual_seed(1)))
    prompt = build_system_prompt(long_context, voice, [5, 6, 7])
    engine = Engine(lm, mimi, max_slots=2)
    engine.join(0, 1, prompt, SamplingConfig(seed=3))
    outputs = [engine.step(0.05 * torch.randn(2, 1920)) for _ in range(6)]
    tokens = torch.stack([o.tokens[0] for o in outputs])
    assert torch.isfinite(torch.stack([o.pcm for o in outputs])).all()
    assert ((tokens[-1, 1:9] >= 0) & (tokens[-1, 1:9] < CONFIG.card)).all()


def test_unknown_mode_and_missing_torchao_say_what_to_do(monkeypatch):
    with pytest.raises(QuantizationError, match="int4.*choose one of: none, int8, fp8"):
        check_mode("int4")
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(QuantizationError, match=r"pip install 'personaplex\[quantize\]'"):
        check_mode("int8")
    check_mode("none")  # needs nothing


def test_seven_b_int8_weights_fit_the_memory_goal():
    """PersonaPlex-7B with int8 weights: what the loader will allocate, from the real layout."""
    from personaplex.deploy.estimates import lm_bytes

    config = get_preset("personaplex-7b").lm
    assert 15.5 < lm_bytes(config, "none", torch.bfloat16) / 2**30 < 15.7
    int8 = lm_bytes(config, "int8", torch.bfloat16) / 2**30
    assert 8.0 < int8 < 8.2  # + 1.5 GiB KV for one conversation + Mimi: under 12 GiB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_step_captured_as_cuda_graph_replays_the_eager_step(checkpoint, mode):
    from personaplex.cuda_graph import CapturedStep

    model = load_lm(checkpoint, CONFIG, device="cuda", dtype=torch.bfloat16, quantize=mode)
    assert summarize(model).declined == []
    generator = Generator(model)
    forced = torch.randint(0, CONFIG.card, (2, CONFIG.num_channels), device="cuda")
    forced[:, 0] = torch.randint(0, CONFIG.text_card, (2,), device="cuda")
    results = {}
    with torch.inference_mode():
        for graphed in (False, True):
            gen_state, lm_state = generator.new_state(2), model.new_state(2)

            def step(forced, gen_state=gen_state, lm_state=lm_state):
                return generator.step(gen_state, lm_state, forced, return_audio_logits=True).text_logits

            if graphed:
                captured = CapturedStep(step, {"forced": forced}, gen_state.tensors())
                results[graphed] = [captured(forced=forced).clone() for _ in range(4)]
            else:
                results[graphed] = [step(forced).clone() for _ in range(4)]
    for eager, replay in zip(results[False], results[True]):
        # Same kernels; only the matmul library's choices may differ between capture and eager.
        torch.testing.assert_close(replay, eager, rtol=1e-2, atol=1e-2)
