"""CUDA paths: the golden session on the GPU, and steps free of host synchronisation.

Skipped where no CUDA device exists (CI); run on a GPU machine with the same command.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from personaplex.config import LMConfig, MimiConfig
from personaplex.lm.generator import BatchSampling, Generator
from personaplex.lm.sampling import TokenSampling
from personaplex.loading import load_lm, load_mimi
from personaplex.persona import apply_system_prompt, load_saved_voice, system_prompt_frames

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def configs(golden_config):
    return LMConfig.from_reference_kwargs(golden_config["lm"]["config"]), MimiConfig.from_reference_kwargs(golden_config["mimi"])


def run_user_phase(lm, mimi, golden, session, dtype_device, kernels: str = "eager"):
    from personaplex.engine.kernels import engine_kernels

    device = dtype_device
    chosen = engine_kernels(lm, mimi, kernels)
    generator = Generator(lm, chosen.lm)
    gen_state, lm_state = generator.new_state(1), lm.new_state(1)
    voice = load_saved_voice(golden / "voice_prompt_embeddings.safetensors", lm.config)
    apply_system_prompt(generator, gen_state, lm_state, system_prompt_frames(lm.config, None, session["text_prompt_tokens"].tolist()), voice)
    encoder, decoder = mimi.new_encoder_state(1, device), mimi.new_decoder_state(1, device)
    user = session["user_audio_loaded"]
    frames = torch.nn.functional.pad(user, (0, -user.shape[0] % 1920)).view(-1, 1920).to(device)
    tokens, pcm = [], []
    for frame in frames:
        forced = torch.full((1, 17), -1, device=device)
        forced[:, 9:] = mimi.encode_frame(frame[None], encoder, chosen.codec)
        result = generator.step(gen_state, lm_state, forced)
        tokens.append(result.tokens[0])
        pcm.append(mimi.decode_frame(result.tokens[:, 1:9], decoder, chosen.codec)[0])
    return torch.stack(tokens).cpu(), torch.stack(pcm).cpu()


@pytest.mark.parametrize("kernels", ["eager", "triton", "compile"])
def test_golden_session_float32_on_gpu(golden, golden_config, configs, kernels):
    """Through every kernel set an engine may use on CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    session = load_file(golden / "golden_lm_session.safetensors")
    lm = load_lm(golden / golden_config["lm"]["file"], configs[0], device="cuda", dtype=torch.float32)
    mimi = load_mimi(golden / golden_config["mimi"]["file"], configs[1], device="cuda")
    tokens, pcm = run_user_phase(lm, mimi, golden, session, torch.device("cuda"), kernels)
    assert torch.equal(tokens, session["replay_step_out_tokens"][-tokens.shape[0]:])
    torch.testing.assert_close(pcm, session["replay_agent_pcm"], atol=1e-5, rtol=0)


def test_golden_session_bfloat16_agreement_is_reported(golden, golden_config, configs, capsys):
    session = load_file(golden / "golden_lm_session.safetensors")
    lm = load_lm(golden / golden_config["lm"]["file"], configs[0], device="cuda", dtype=torch.bfloat16)
    mimi = load_mimi(golden / golden_config["mimi"]["file"], configs[1], device="cuda")
    tokens, _ = run_user_phase(lm, mimi, golden, session, torch.device("cuda"))
    expected = session["replay_step_out_tokens"][-tokens.shape[0]:]
    agreement = (tokens[:, :9] == expected[:, :9]).float().mean().item()
    with capsys.disabled():
        print(f"\nbf16 GPU vs float32 reference, free-running agent tokens: {100 * agreement:.1f}% equal")
    assert tokens[:, 9:].equal(expected[:, 9:])  # the user's own codes (Mimi in float32) are exact


def test_lm_step_does_not_synchronise_with_host(golden, golden_config, configs):
    lm = load_lm(golden / golden_config["lm"]["file"], configs[0], device="cuda", dtype=torch.bfloat16)
    generator = Generator(lm)
    gen_state, lm_state = generator.new_state(3), lm.new_state(3)
    forced = torch.full((3, 17), -1, device="cuda")
    forced[:, 9:] = 5
    sampling = BatchSampling(
        text=TokenSampling.fill(3, 0.7, 25, "cuda"), audio=TokenSampling.fill(3, 0.8, 250, "cuda"),
        seed=torch.tensor([1, 2, 3], device="cuda"),
    )
    generator.step(gen_state, lm_state, forced, sampling=sampling)
    joining = torch.tensor([False, True, False], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            generator.step(gen_state, lm_state, forced, sampling=sampling)
        generator.reset(gen_state, joining)
        generator.step(gen_state, lm_state, forced)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("kernels", ["eager", "triton", "compile"])
def test_captured_frame_equals_eager(golden, golden_config, configs, kernels):
    """Mimi encode + LM step + Mimi decode replayed as one CUDA graph with a GPU kernel set computes what
    the eager set does op by op."""
    from personaplex.cuda_graph import CapturedStep
    from personaplex.engine.kernels import engine_kernels

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    lm = load_lm(golden / golden_config["lm"]["file"], configs[0], device="cuda", dtype=torch.float32)
    mimi = load_mimi(golden / golden_config["mimi"]["file"], configs[1], device="cuda")
    runs = []
    for graphed in (False, True):
        chosen = engine_kernels(lm, mimi, kernels if graphed else "eager")
        generator = Generator(lm, chosen.lm)
        gen_state, lm_state = generator.new_state(2), lm.new_state(2)
        enc, dec = mimi.new_encoder_state(2, "cuda"), mimi.new_decoder_state(2, "cuda")
        sampling = BatchSampling(
            text=TokenSampling.fill(2, 0.7, 25, "cuda"), audio=TokenSampling.fill(2, 0.8, 250, "cuda"),
            seed=torch.tensor([5, 6], device="cuda"),
        )

        def frame(pcm):
            codes = mimi.encode_frame(pcm, enc, chosen.codec)
            forced = torch.cat([torch.full((2, 9), -1, device="cuda"), codes], dim=1)
            result = generator.step(gen_state, lm_state, forced, sampling=sampling)
            return result.tokens, mimi.decode_frame(result.tokens[:, 1:9], dec, chosen.codec)

        generator_input = torch.Generator().manual_seed(0)
        pcm = 0.1 * torch.randn(30, 2, 1920, generator=generator_input)
        step = frame
        if graphed:
            captured = CapturedStep(frame, {"pcm": pcm[0].cuda()}, gen_state.tensors() + enc.tensors() + dec.tensors())
            step = lambda pcm: captured(pcm=pcm)  # noqa: E731
        outputs = [tuple(t.clone() for t in step(p.cuda())) for p in pcm]
        runs.append(outputs)
    for (tokens_eager, pcm_eager), (tokens_graph, pcm_graph) in zip(*runs):
        assert torch.equal(tokens_eager, tokens_graph)
        torch.testing.assert_close(pcm_eager, pcm_graph, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernels", ["triton", "compile"])
def test_fp8_step_equals_eager_step(golden, golden_config, configs, kernels):
    """FP8 rings: the GPU kernel sets, whose attention reads the quantised ring directly, give the eager
    set's outputs (float32 weights, so only rounding differs)."""
    from personaplex.lm.fused import step_kernels

    lm = load_lm(golden / golden_config["lm"]["file"], configs[0], device="cuda", dtype=torch.float32)
    forced = torch.randint(0, 2048, (40, 3, 17), generator=torch.Generator().manual_seed(0)).cuda()
    forced[:, :, :9] = -1
    runs = []
    for name in ("eager", kernels):
        generator = Generator(lm, step_kernels(lm, name))
        gen_state, lm_state = generator.new_state(3), lm.new_state(3, kv_dtype="fp8")
        runs.append([generator.step(gen_state, lm_state, f, used_length=lm.config.context) for f in forced])
    for plain, fused in zip(*runs):
        torch.testing.assert_close(plain.text_logits, fused.text_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(plain.tokens, fused.tokens)


def test_golden_session_through_the_gpu_engine(golden, golden_config, configs, run_golden_through_engine):
    """The engine as served on a GPU (compiled kernels, Mimi's compiled transformers, the user's frame
    encoded on a side stream beside the temporal transformer, the whole frame replayed as a CUDA graph)
    reproduces the reference session."""
    from personaplex.engine import Engine

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    session = load_file(golden / "golden_lm_session.safetensors")
    lm = load_lm(golden / golden_config["lm"]["file"], configs[0], device="cuda", dtype=torch.float32)
    mimi = load_mimi(golden / golden_config["mimi"]["file"], configs[1], device="cuda")
    engine = Engine(lm, mimi, max_slots=2)
    assert engine.kernels.name == "triton"  # the GPU default ("auto") without PERSONAPLEX_KERNELS
    tokens, pcm = run_golden_through_engine(engine, lm, mimi, "voice_prompt.pt")
    assert torch.equal(tokens, session["replay_step_out_tokens"][-len(tokens):])
    torch.testing.assert_close(pcm, session["replay_agent_pcm"], atol=1e-5, rtol=0)


def test_new_persona_prefilled_by_captured_blocks_equals_prefill_in_place(monkeypatch):
    """A new persona's prompt run as CUDA graphs of padded blocks in the scratch slot (every block size
    and ring length captured ahead of time, as a server does at start) leaves the same KV state in its
    slot as the eager prefill in place."""
    import dataclasses

    from personaplex.config import DEMO_LM, SMALL_MIMI
    from personaplex.engine import Engine, SamplingConfig
    from personaplex.lm.model import LMModel
    from personaplex.persona import VoicePrompt, build_system_prompt
    from personaplex.random_weights import random_mimi, randomize_

    torch.backends.cuda.matmul.allow_tf32 = False
    config = dataclasses.replace(DEMO_LM, num_layers=2)
    lm = randomize_(LMModel(config), seed=3).eval().requires_grad_(False).cuda()
    mimi = random_mimi(SMALL_MIMI, torch.device("cuda"))
    g = torch.Generator().manual_seed(5)
    voice = VoicePrompt("random", codes=torch.randint(0, 2048, (125, 8), generator=g))
    prompt = build_system_prompt(config, voice, torch.randint(4, config.text_card, (60,), generator=g).tolist())
    from personaplex.cuda_graph import CapturedStep

    replayed = []
    replay = CapturedStep.__call__
    monkeypatch.setattr(CapturedStep, "__call__", lambda self, **inputs: replayed.append(self) or replay(self, **inputs))
    states = []
    for scratch in (True, False):
        engine = Engine(lm, mimi, max_slots=2, kernels="eager")
        engine.scratch_prefill = scratch
        if scratch:
            engine.capture_graphs(up_to_frames=256)
            graphs = dict(engine._prefill_graphs._graphs)
            assert len(graphs) == 12  # 3 block sizes x 4 ring lengths, captured at start
        engine.join(1, 2, prompt, SamplingConfig(greedy=True))
        if scratch:
            assert engine._prefill_graphs._graphs == graphs  # nothing captured during the join
            assert [g for g in replayed if g in graphs.values()] == [graphs[(256, 256)]]  # one block, replayed
        torch.cuda.synchronize()
        states.append([t[:, 1, :, : prompt.num_steps].float().cpu() for t in engine.lm_state.tensors()])
    for graphed, in_place in zip(*states):
        torch.testing.assert_close(graphed, in_place, rtol=1e-4, atol=1e-4)


def test_compiled_kernels_really_compile_and_run_in_the_engine():
    """The "compile" set's functions are torch.compile'd, and an engine step through them makes Dynamo
    compile frames: it does not silently run the eager functions."""
    import dataclasses

    from torch._dynamo.utils import counters

    from personaplex.config import DEMO_LM, SMALL_MIMI
    from personaplex.engine import Engine
    from personaplex.lm.fused import step_kernels
    from personaplex.lm.model import LMModel
    from personaplex.random_weights import random_mimi, randomize_

    lm = randomize_(LMModel(dataclasses.replace(DEMO_LM, num_layers=2)), seed=3).eval().requires_grad_(False).cuda()
    mimi = random_mimi(SMALL_MIMI, torch.device("cuda"))
    compiled, eager = step_kernels(lm, "compile"), step_kernels(lm, "eager")
    for field in ("embed", "attention_input", "attention_output_and_ffn", "forward_depth", "choose_tokens",
                  "write_given", "commit"):
        function = getattr(compiled, field)
        assert function != getattr(eager, field) and hasattr(function, "_torchdynamo_orig_callable"), field
    before = counters["stats"]["unique_graphs"]
    engine = Engine(lm, mimi, max_slots=2, kernels="compile", use_cuda_graph=False)
    engine.step(torch.zeros(2, 1920))
    assert counters["stats"]["unique_graphs"] > before


@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_pinned_and_sliding_slots_past_the_context_through_cuda_graphs(kv_dtype):
    """A pin-persona and a sliding conversation, 2.5 contexts long, stepped by captured CUDA graphs with the
    "triton" kernels (pinning graphs captured at start, none during the steps): the same tokens as the
    same engine stepping without graphs."""
    import dataclasses

    from personaplex.config import DEMO_LM, SMALL_MIMI
    from personaplex.engine import Engine, SamplingConfig
    from personaplex.lm.model import LMModel
    from personaplex.persona import VoicePrompt, build_system_prompt
    from personaplex.random_weights import random_mimi, randomize_

    config = dataclasses.replace(DEMO_LM, num_layers=2, context=64)
    lm = randomize_(LMModel(config), seed=3).eval().requires_grad_(False).cuda()
    mimi = random_mimi(SMALL_MIMI, torch.device("cuda"))
    g = torch.Generator().manual_seed(5)
    prompts = [
        build_system_prompt(dataclasses.replace(config, context=3000),
                            VoicePrompt("random", codes=torch.randint(0, 2048, (3, 8), generator=g)),
                            torch.randint(4, config.text_card, (4,), generator=g).tolist())
        for _ in range(2)
    ]
    audio = 0.1 * torch.randn(160, 2, 1920, generator=g)
    runs = []
    for graphs in (True, False):
        engine = Engine(lm, mimi, max_slots=2, kv_dtype=kv_dtype, kernels="triton", use_cuda_graph=graphs)
        if graphs:
            engine.capture_graphs(pinning=True)
            captured = set(engine._graphs)
            assert any(len(key) == 3 for key in captured)
        engine.join(0, 1, prompts[0], SamplingConfig(greedy=True), context_policy="pin-persona")
        engine.join(1, 2, prompts[1], SamplingConfig(greedy=True), context_policy="sliding")
        runs.append(torch.stack([engine.step(frame).tokens for frame in audio]))
        if graphs:
            assert set(engine._graphs) == captured  # nothing captured while conversations ran
    assert torch.equal(runs[0], runs[1])


def test_more_slots_than_the_gpu_holds_are_refused_before_any_state_is_allocated():
    from personaplex.config import DEMO_LM, SMALL_MIMI
    from personaplex.engine import check_slots_fit, slots_that_fit
    from personaplex.errors import UsageError
    from personaplex.lm.model import LMModel
    from personaplex.random_weights import random_mimi

    lm = LMModel(DEMO_LM).cuda()
    mimi = random_mimi(SMALL_MIMI, torch.device("cuda"))
    fit = slots_that_fit(lm, mimi, "fp8")
    check_slots_fit(lm, mimi, fit, "fp8")  # what fits is accepted
    allocated = torch.cuda.memory_allocated()
    with pytest.raises(UsageError, match=f"room for {fit}"):
        check_slots_fit(lm, mimi, fit + 1, "fp8")
    assert torch.cuda.memory_allocated() == allocated
