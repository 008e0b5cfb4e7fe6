"""CPU offload: temporal layers in host memory streamed through shared staging buffers give exactly the
outputs of the resident model (steps and prompt prefill), whatever the number of layers and buffers.

On a CPU the device and the host are one memory, but the mechanism is the same: offloaded layers'
weights live in separate host tensors, every pass copies them into the shared buffers in the prefetch
order, and a layer computes on whatever its buffer holds at that moment, so a wrong schedule gives
wrong outputs (``test_a_broken_schedule_is_detected``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaplex.config import TINY_LM
from personaplex.deploy.offload import StreamedLayers, enable_offload
from personaplex.deploy.quantize import tensor_parts
from personaplex.lm.generator import Generator
from personaplex.loading import load_lm
from personaplex.persona import VoicePrompt, apply_system_prompt, build_system_prompt
from personaplex.random_weights import write_random_lm_checkpoint

# Five layers: with two buffers, offloaded layers share buffers and wait for each other's compute.
CONFIG = dataclasses.replace(TINY_LM, num_layers=5, hidden_scale=4.5, depformer_dim_feedforward=96, context=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_lm_checkpoint(CONFIG, tmp_path_factory.mktemp("lm") / "lm.safetensors", seed=5)


def session(model, frames: int = 8) -> torch.Tensor:
    """A prompt prefill (many frames in one pass) then teacher-forced steps; all logits, flattened."""
    cfg = model.config
    generator = Generator(model)
    gen_state, lm_state = generator.new_state(2), model.new_state(2)
    draw = torch.Generator().manual_seed(11)
    voice = VoicePrompt("random", codes=torch.randint(0, cfg.card, (5, 8), generator=draw))
    prompt = build_system_prompt(dataclasses.replace(cfg, context=3000), voice, [4, 5, 6])
    outputs = []
    with torch.inference_mode():
        apply_system_prompt(generator, gen_state, lm_state, prompt.frames[: cfg.context - 8], None)
        outputs.append(lm_state.keys.flatten().float())
        for _ in range(frames):
            forced = torch.randint(0, cfg.card, (2, cfg.num_channels), generator=draw)
            forced[:, 0] = torch.randint(0, cfg.text_card, (2,), generator=draw)
            result = generator.step(gen_state, lm_state, forced, return_audio_logits=True)
            outputs += [result.text_logits.flatten().float(), result.audio_logits.flatten().float()]
    return torch.cat(outputs)


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("offloaded", [1, 3, 5])
def test_offloaded_layers_give_identical_outputs(checkpoint, quantize, offloaded):
    if quantize != "none":
        pytest.importorskip("torchao", reason="--quantize needs torchao: pip install -e '.[quantize]'")
    reference = session(load_lm(checkpoint, CONFIG, dtype=torch.float32, quantize=quantize))
    model = load_lm(checkpoint, CONFIG, dtype=torch.float32, quantize=quantize, offload_layers=offloaded)
    layers = model.transformer.layers
    assert isinstance(layers, StreamedLayers) and layers.offloaded == list(range(5 - offloaded, 5))
    assert torch.equal(session(model), reference)


@pytest.mark.parametrize("buffers", [1, 2, 3])
def test_any_number_of_staging_buffers_gives_identical_outputs(checkpoint, buffers):
    reference = session(load_lm(checkpoint, CONFIG, dtype=torch.float32))
    model = load_lm(checkpoint, CONFIG, dtype=torch.float32)
    streamed = enable_offload(model, [1, 2, 3, 4], "cpu", buffers=buffers)
    assert len(streamed._staging) == buffers
    assert torch.equal(session(model), reference)


def test_offloaded_weights_live_in_host_tensors_apart_from_the_staging_buffers(checkpoint):
    pytest.importorskip("torchao", reason="--quantize needs torchao: pip install -e '.[quantize]'")
    model = load_lm(checkpoint, CONFIG, dtype=torch.float32, quantize="int8", offload_layers=3)
    streamed = model.transformer.layers
    host_pointers = {t.data_ptr() for host in streamed._host for t in host}
    staging_pointers = {t.data_ptr() for staging in streamed._staging for t in staging}
    assert len(host_pointers) == sum(len(host) for host in streamed._host)  # one host copy per layer
    assert not host_pointers & staging_pointers
    # Offloaded layers compute on the staging buffers: layers 2 and 4 share buffer 0, layer 3 has buffer 1.
    def pointers(index):
        return {t.data_ptr() for p in streamed[index].parameters() for t in tensor_parts(p).values()}

    assert pointers(2) == pointers(4) != pointers(3)
    assert pointers(2) <= staging_pointers and not pointers(0) & staging_pointers
    per_layer = sum(t.numel() * t.element_size() for t in streamed._host[0])
    assert streamed.streamed_bytes == 3 * per_layer


def test_a_broken_schedule_is_detected(checkpoint, monkeypatch):
    """If a prefetch were skipped, the layer would compute on the previous occupant of its buffer:
    the comparison above would see it (so it can fail)."""
    reference = session(load_lm(checkpoint, CONFIG, dtype=torch.float32))
    model = load_lm(checkpoint, CONFIG, dtype=torch.float32)
    enable_offload(model, [1, 2, 3, 4], "cpu", buffers=2)
    original = StreamedLayers._copy_in

    def skip_later_copies(self, k):
        if k < 2:
            original(self, k)

    monkeypatch.setattr(StreamedLayers, "_copy_in", skip_later_copies)
    assert not torch.equal(session(model), reference)
    monkeypatch.setattr(StreamedLayers, "_copy_in", original)
    assert torch.equal(session(model), reference)


def test_state_dict_names_are_unchanged(checkpoint):
    plain = load_lm(checkpoint, CONFIG, dtype=torch.float32)
    model = load_lm(checkpoint, CONFIG, dtype=torch.float32, offload_layers=2)
    assert [n for n, _ in model.named_parameters(remove_duplicate=False)] == [n for n, _ in plain.named_parameters()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_offloaded_step_captured_as_cuda_graph_equals_the_resident_model(checkpoint, quantize):
    """Copies on the side stream and their events are captured with the step and replayed each frame."""
    from personaplex.cuda_graph import CapturedStep

    def run(model) -> list[torch.Tensor]:
        generator = Generator(model)
        gen_state, lm_state = generator.new_state(2), model.new_state(2)
        forced = torch.randint(0, CONFIG.card, (2, CONFIG.num_channels), generator=torch.Generator().manual_seed(2)).cuda()
        with torch.inference_mode():
            captured = CapturedStep(
                lambda forced: generator.step(gen_state, lm_state, forced, return_audio_logits=True).text_logits,
                {"forced": forced}, gen_state.tensors(),
            )
            return [captured(forced=forced).clone() for _ in range(5)]

    resident = run(load_lm(checkpoint, CONFIG, device="cuda", dtype=torch.bfloat16, quantize=quantize))
    model = load_lm(checkpoint, CONFIG, device="cuda", dtype=torch.bfloat16, quantize=quantize, offload_layers=4)
    host_parts = [t for host in model.transformer.layers._host for t in host]
    assert all(t.device.type == "cpu" and t.is_pinned() for t in host_parts)
    for found, expected in zip(run(model), resident):
        torch.testing.assert_close(found, expected, rtol=0, atol=0)
