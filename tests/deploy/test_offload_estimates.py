"""Up-front estimates: whether CPU offload keeps real time, how many layers must leave the GPU, how
slowly a CPU-only run goes; and the command-line messages and errors built on them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaplex.checkpoint import build_lm
from personaplex.config import get_preset
from personaplex.deploy import plan as plan_module
from personaplex.deploy import estimates
from personaplex.deploy.plan import DeploymentError, plan_load
from personaplex.deploy.quantize import matmul_weight_names

SEVEN_B = get_preset("personaplex-7b").lm
GIB = 2**30


def test_values_read_per_frame_are_the_weights_a_step_multiplies():
    """Counted from the model itself: every temporal matmul weight and the text head, and of the depth
    transformer only the slices and heads of the codebooks a step computes."""
    for name in ("tiny", "demo", "personaplex-7b"):
        config = get_preset(name).lm
        model = build_lm(config)  # meta: no memory
        steps = config.agent_codebooks
        weights = dict(model.named_parameters())
        temporal = sum(weights[n].numel() for n in matmul_weight_names(model) if n.startswith("transformer."))
        temporal += weights["text_linear.weight"].numel()
        depth = 0
        for n in matmul_weight_names(model):
            if n.startswith(("depformer_in.", "linears.")):
                depth += weights[n].numel() if int(n.split(".")[1]) < steps else 0
            elif n.startswith("depformer.") and ".gating." in n:
                depth += weights[n].numel() if int(n.split(".")[4]) < steps else 0
            elif n.startswith("depformer."):
                depth += weights[n].numel() * steps // config.dep_q  # stacked per codebook: the used slices
        assert estimates.values_read_per_frame(config) == (temporal, temporal + depth)


def test_offload_verdicts():
    fast = estimates.offload_estimate(SEVEN_B, 4, "none", torch.bfloat16, bandwidth=50e9)
    assert fast.streamed_bytes == 4 * estimates.layer_bytes(SEVEN_B, "none", torch.bfloat16)
    assert fast.real_time and "should keep real time" in fast.describe()
    half = estimates.offload_estimate(SEVEN_B, 16, "none", torch.bfloat16, bandwidth=50e9)
    assert not half.real_time and 125 < half.transfer_ms < 140
    assert "will NOT keep real time (1.6x slower)" in half.describe() and "--quantize int8" in half.describe()
    half_int8 = estimates.offload_estimate(SEVEN_B, 16, "int8", torch.bfloat16, bandwidth=50e9)
    assert 60 < half_int8.transfer_ms < 80 and "at the edge of real time" in half_int8.describe()


def test_layers_to_offload_fit_the_free_memory():
    other = 3 * GIB
    per_layer = estimates.layer_bytes(SEVEN_B, "none", torch.bfloat16)
    assert estimates.layers_to_offload(SEVEN_B, "none", torch.bfloat16, 80 * GIB, other) == 0
    assert estimates.layers_to_offload(SEVEN_B, "int8", torch.bfloat16, 12 * GIB, other) == 0
    count = estimates.layers_to_offload(SEVEN_B, "none", torch.bfloat16, 12 * GIB, other)
    resident = SEVEN_B.num_layers - count
    rest = estimates.lm_bytes(SEVEN_B, "none", torch.bfloat16) - SEVEN_B.num_layers * per_layer
    used = rest + (resident + 2) * per_layer + other  # two staging buffers
    assert used <= 12 * GIB < used + per_layer
    assert estimates.layers_to_offload(SEVEN_B, "none", torch.bfloat16, 3 * GIB, other) == SEVEN_B.num_layers + 1


def test_cpu_estimate_scales_with_the_model_and_says_how_long():
    tiny = estimates.cpu_estimate(get_preset("tiny").lm, "tiny", torch.float32, "none", slots=1, prompt_frames=200)
    assert 0 < tiny.seconds_per_frame < 0.08 and tiny.slowdown < 1
    big = estimates.cpu_estimate(SEVEN_B, "personaplex-7b", torch.float32, "none", slots=2, prompt_frames=200)
    assert big.seconds_per_frame > 1000 * tiny.seconds_per_frame and big.prefill_seconds > 0
    estimate = estimates.CpuEstimate("personaplex-7b", seconds_per_frame=2.0, prefill_seconds=30.0, slots=2)
    assert estimate.slowdown == pytest.approx(25)
    assert estimate.total_seconds([100, 100, 50]) == pytest.approx(3 * 30 + 125 * 2.0)
    text = estimate.describe([100, 100, 50])
    assert "about 2.00 s per 80 ms frame step (25x slower than real time)" in text
    assert "3 input(s), 20.0 s of audio, 2 at a time, will take about 6 min" in text


def test_cpu_plan_says_how_slowly_before_loading():
    plan = plan_load(get_preset("personaplex-7b"), "cpu", slots=1, input_frames=[250])
    assert plan.device.type == "cpu" and plan.dtype == torch.float32 and plan.offload_layers == 0
    assert any("running personaplex-7b on the CPU" in m and "slower than real time" in m for m in plan.messages)
    demo = plan_load(get_preset("demo"), "cpu", slots=1, input_frames=[250])
    assert demo.messages == []  # fast enough: nothing to warn about


def test_cpu_plan_warns_when_the_weights_exceed_the_memory(monkeypatch):
    monkeypatch.setattr(plan_module, "_available_host_memory", lambda: 8 * GIB)
    plan = plan_load(get_preset("personaplex-7b"), "cpu", input_frames=[10])
    assert any("31.5 GiB in float32 but only 8.0 GiB" in m and "--quantize int8" in m for m in plan.messages)


def test_offload_flags_are_checked():
    with pytest.raises(DeploymentError, match="with --device cpu everything is in host memory"):
        plan_load(get_preset("demo"), "cpu", cpu_offload=True)
    with pytest.raises(DeploymentError, match="--offload-layers takes 0..4"):
        plan_load(get_preset("demo"), "cpu", offload_layers=9)


def test_gpu_plan_picks_the_layers_to_offload(monkeypatch):
    """The GPU side of the plan with the device's answers replaced (no GPU here): free memory and link speed."""
    pytest.importorskip("torchao", reason="--quantize needs torchao: pip install -e '.[quantize]'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (12 * GIB, 16 * GIB))
    monkeypatch.setattr(plan_module, "measure_host_to_device_bandwidth", lambda device: 25e9)
    preset = get_preset("personaplex-7b")
    with pytest.raises(DeploymentError, match="needs about .* GiB of GPU memory .* 12.0 GiB are free: add --quantize int8"):
        plan_load(preset, "cuda", dtype=torch.bfloat16)
    assert plan_load(preset, "cuda", dtype=torch.bfloat16, quantize="int8").offload_layers == 0
    plan = plan_load(preset, "cuda", dtype=torch.bfloat16, cpu_offload=True)
    assert 0 < plan.offload_layers < 32
    assert any(f"{plan.offload_layers} of 32 temporal layers" in m and "will NOT keep real time" in m for m in plan.messages)
    small = dataclasses.replace(preset, name="small-test", lm=get_preset("small").lm)
    assert plan_load(small, "cuda", dtype=torch.bfloat16, cpu_offload=True).messages == [
        "CPU offload: the whole model fits on the GPU, nothing to offload"
    ]


@pytest.mark.slow
def test_offline_quantized_run_and_flag_errors(tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    import numpy as np
    import sphn

    from personaplex.offline import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    user = tmp_path / "user.wav"
    sphn.write_wav(str(user), (0.1 * np.sin(np.arange(48_000) * 0.05)).astype(np.float32), 24_000)
    out_wav, out_json = tmp_path / "out.wav", tmp_path / "out.json"
    common = ["--model", "demo", "--input-wav", str(user), "--output-wav", str(out_wav),
              "--output-text", str(out_json), "--seed", "1", "--device", "cpu"]
    assert main(common + ["--cpu-offload"]) == 2
    assert main(common + ["--offload-layers", "2"]) == 2
    assert not out_wav.exists()
    assert main(common + ["--quantize", "int8"]) == 0
    assert out_wav.stat().st_size > 0 and out_json.stat().st_size > 0
