"""Engine correctness under churn: each conversation's frames equal the same conversation run alone,
whatever the others do (joining, leaving, reusing a slot, hitting the prefix cache, growing the ring
length the batch reads, wrapping the ring)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from personaplex.codec import Mimi
from personaplex.config import DEMO_LM, SMALL_MIMI
from personaplex.engine import Engine, SamplingConfig
from personaplex.engine import engine as engine_module
from personaplex.engine import prefill_graphs
from personaplex.engine.prefill_graphs import padded_size
from personaplex.lm.fused import step_kernels
from personaplex.lm.model import LMModel
from personaplex.persona import VoicePrompt, build_system_prompt
from personaplex.random_weights import random_mimi_state_dict, randomize_

CONTEXT = 64  # small ring: conversations below wrap it within the test


@pytest.fixture(scope="module")
def models():
    config = dataclasses.replace(DEMO_LM, context=CONTEXT, num_layers=2)
    lm = randomize_(LMModel(config), seed=1).eval().requires_grad_(False)
    mimi = Mimi(SMALL_MIMI)
    mimi.load_state_dict(random_mimi_state_dict(SMALL_MIMI, seed=2))
    return lm, mimi.eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def short_length_buckets(monkeypatch):
    monkeypatch.setattr(engine_module, "LENGTH_BUCKET", 16)


def persona(lm, seed: int):
    generator = torch.Generator().manual_seed(seed)
    voice = VoicePrompt("random", codes=torch.randint(0, 2048, (3, 8), generator=generator))
    text = torch.randint(4, lm.config.text_card, (4,), generator=generator).tolist()
    config = dataclasses.replace(lm.config, context=3000)  # bypass the room check for this tiny ring
    return build_system_prompt(config, voice, text)


def triton_attention_only(lm, mimi):
    """The eager kernel set with the GPU's decode attention (the Triton kernel) in place of its own, named
    "triton" as the engine's GPU default is."""
    from personaplex.engine.kernels import EngineKernels
    from personaplex.lm.fused import gpu_write_and_attend

    lm_kernels = dataclasses.replace(step_kernels(lm), name="triton", write_and_attend=gpu_write_and_attend)
    return EngineKernels("triton", lm_kernels, mimi.stream_kernels())


def user_audio(seed: int, frames: int) -> torch.Tensor:
    return 0.1 * torch.randn(frames, 1920, generator=torch.Generator().manual_seed(seed))


def run_alone(lm, mimi, prompt, sampling, audio, kv_dtype, context_policy="sliding"):
    engine = Engine(lm, mimi, max_slots=1, kv_dtype=kv_dtype)
    engine.join(0, 1, prompt, sampling, context_policy=context_policy)
    outputs = [engine.step(frame[None]) for frame in audio]
    return torch.stack([o.tokens[0] for o in outputs]), torch.stack([o.pcm[0] for o in outputs])


@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_conversations_in_a_changing_batch_equal_running_alone(models, kv_dtype):
    lm, mimi = models
    p1, p2 = persona(lm, 1), persona(lm, 2)
    # name: (slot, join tick, leave tick, prompt, sampling, audio seed)
    plan = {
        "A": (0, 0, 30, p1, SamplingConfig(seed=11), 1),
        "B": (1, 5, 100, p2, SamplingConfig(seed=12), 2),
        "C": (2, 12, 60, p1, SamplingConfig(greedy=True), 3),  # same persona as A: prefix cache
        "D": (0, 35, 100, p2, SamplingConfig(seed=14, text_top_k=5, audio_temperature=1.1), 4),  # reuses A's slot
    }
    engine = Engine(lm, mimi, max_slots=4, kv_dtype=kv_dtype)
    recorded = {name: ([], []) for name in plan}
    cache_hits = {}
    for tick in range(100):
        for name, (slot, start, stop, prompt, sampling, _) in plan.items():
            if tick == stop and engine.active[slot] and recorded[name][0]:
                engine.leave(slot)
            if tick == start:
                cache_hits[name] = engine.join(slot, slot + 1, prompt, sampling)
        pcm = torch.zeros(4, 1920)
        for name, (slot, start, stop, _, _, seed) in plan.items():
            if start <= tick < stop:
                pcm[slot] = user_audio(seed, stop - start)[tick - start]
        out = engine.step(pcm)
        for name, (slot, start, stop, _, _, _) in plan.items():
            if start <= tick < stop:
                recorded[name][0].append(out.tokens[slot])
                recorded[name][1].append(out.pcm[slot])
    assert cache_hits == {"A": False, "B": False, "C": True, "D": True}
    for name, (slot, start, stop, prompt, sampling, seed) in plan.items():
        tokens, pcm = run_alone(lm, mimi, prompt, sampling, user_audio(seed, stop - start), kv_dtype)
        assert torch.equal(torch.stack(recorded[name][0]), tokens), name
        torch.testing.assert_close(torch.stack(recorded[name][1]), pcm, atol=1e-5, rtol=0)


def test_idle_slots_do_not_stretch_the_ring_read(models):
    lm, mimi = models
    engine = Engine(lm, mimi, max_slots=4)
    engine.join(2, 3, persona(lm, 1), SamplingConfig(greedy=True))
    for _ in range(3):
        engine.step(torch.zeros(4, 1920))
    batch, length = engine._bucket()
    assert batch == 4 and length == 32  # prompt (23 steps) + 3 frames -> offset 26 -> bucket of 16s: 32
    engine.leave(2)
    assert engine._bucket() == (1, 16)


def test_fp8_rings_through_the_triton_kernel_need_no_length_buckets(models):
    """The GPU's FP8 decode attention reads each slot only up to its own length: one ring length (the
    whole context) serves every step, so a server captures one graph per batch bucket, not per length."""
    lm, mimi = models
    # As the "triton" set (nothing runs here: only the bucket choice is checked, no Triton needed).
    triton_like = triton_attention_only(lm, mimi)
    for kv_dtype, own_lengths in (("fp8", True), ("model", False)):
        engine = Engine(lm, mimi, max_slots=4, kv_dtype=kv_dtype)
        engine.join(2, 3, persona(lm, 1), SamplingConfig(greedy=True))
        assert not engine.reads_own_lengths() and engine._bucket() == (4, 32)  # the eager set reads its bucket
        engine = Engine(lm, mimi, max_slots=4, kv_dtype=kv_dtype, kernels=triton_like)
        engine.join(2, 3, persona(lm, 1), SamplingConfig(greedy=True))
        assert engine.reads_own_lengths() is own_lengths
        assert engine._bucket() == ((4, CONTEXT) if own_lengths else (4, 32))


def test_fp8_rings_track_model_dtype_rings(models):
    """FP8 KV changes logits only a little (a proxy for quality: these weights are random)."""
    lm, mimi = models
    prompt = persona(lm, 1)
    logits = {}
    for kv_dtype in ("model", "fp8"):
        engine = Engine(lm, mimi, max_slots=1, kv_dtype=kv_dtype)
        engine.join(0, 1, prompt, SamplingConfig(greedy=True))
        # Teacher-force the text and agent channels with fixed tokens so both runs see the same inputs.
        generator, gen_state, lm_state = engine.generator, engine.gen_state, engine.lm_state
        forced = torch.randint(0, 1024, (40, 17), generator=torch.Generator().manual_seed(3))
        logits[kv_dtype] = torch.stack([generator.step(gen_state, lm_state, f[None]).text_logits[0] for f in forced])
    error = (logits["fp8"] - logits["model"]).norm() / logits["model"].norm()
    assert 0 < error < 0.05, error


@pytest.mark.parametrize("scratch", [False, True], ids=["in-place", "scratch"])
@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_joins_spread_over_ticks_while_others_talk(models, kv_dtype, scratch):
    """A new persona's prefill runs in small blocks between the others' steps; nobody is disturbed and
    the newcomer, once live, behaves exactly as if it had joined at once. "scratch": the GPU way, the
    prompt prefilled in padded fixed-size blocks in a scratch slot and copied in when done (run eagerly
    here; on a GPU the blocks are CUDA graphs)."""
    lm, mimi = models
    p1, p2, p3 = persona(lm, 1), persona(lm, 2), persona(lm, 3)
    engine = Engine(lm, mimi, max_slots=4, kv_dtype=kv_dtype)
    engine.scratch_prefill = scratch
    engine.join_chunk_frames = 4  # the 23-frame prompts take several ticks
    engine.join(0, 1, p1, SamplingConfig(seed=1))
    talkers = {0: (p1, SamplingConfig(seed=1), user_audio(1, 40))}
    joins = {1: (p2, SamplingConfig(seed=2), user_audio(2, 40)), 3: (p3, SamplingConfig(seed=3), user_audio(3, 40))}
    started = {0: 0}
    recorded = {0: [], 1: [], 3: []}
    for tick in range(40):
        # Slot 3 first, so that slot 1 is still joining while the batch (up to slot 3) steps over it.
        if tick == 2:
            assert engine.begin_join(3, 4, *joins[3][:2]) is False
        if tick == 3:
            assert engine.begin_join(1, 2, *joins[1][:2]) is False
        for slot in engine.advance_joins(frame_budget=4):
            started[slot] = tick
            talkers[slot] = joins[slot]
        highest = max(slot for slot in range(4) if engine.active[slot])
        assert engine._bucket()[0] == {0: 1, 1: 2, 3: 4}[highest]  # joining slots do not widen the batch
        pcm = torch.zeros(4, 1920)
        for slot, (_, _, audio) in talkers.items():
            pcm[slot] = audio[tick - started[slot]]
        out = engine.step(pcm)
        for slot in talkers:
            recorded[slot].append(out.tokens[slot])
    assert started[3] >= 2 + 4 and started[1] > started[3] + 3  # the prefills really were spread over ticks
    if scratch:
        assert engine._prefill_graphs is not None  # the scratch path really ran (for slot 3; slot 1 queued behind)
    for slot, (prompt, sampling, audio) in talkers.items():
        frames = len(recorded[slot])
        tokens, _ = run_alone(lm, mimi, prompt, sampling, audio[:frames], kv_dtype)
        assert torch.equal(torch.stack(recorded[slot]), tokens), slot


@pytest.mark.parametrize("cached", [False, True], ids=["prefilled", "prefix-cache"])
@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_a_held_join_starts_as_if_it_had_joined_at_its_start(models, kv_dtype, cached):
    """``hold=True``: the persona is applied, then the slot waits (not stepping, not free) while the others
    talk, whatever audio its row of the batch holds; once started it runs exactly like a conversation that
    joined at that moment, and its neighbour is undisturbed."""
    lm, mimi = models
    p1, p2 = persona(lm, 1), persona(lm, 2)
    engine = Engine(lm, mimi, max_slots=4, kv_dtype=kv_dtype)
    engine.join_chunk_frames = 4
    if cached:  # p2's state lands in the prefix cache
        engine.join(1, 2, p2, SamplingConfig(seed=9))
        engine.leave(1)
    engine.join(0, 1, p1, SamplingConfig(seed=1))
    talker, newcomer = user_audio(1, 30), user_audio(2, 30)
    assert engine.begin_join(1, 2, p2, SamplingConfig(seed=2), hold=True) is cached
    recorded, held_ticks, started = {0: [], 1: []}, 0, None
    for tick in range(30):
        engine.advance_joins(frame_budget=4)
        if not engine._joining and started is None:
            assert not engine.active[1] and 1 not in engine.free_slots()
            held_ticks += 1
            if held_ticks == 6:
                engine.start(1)
                started = tick
        pcm = torch.zeros(4, 1920)
        pcm[0] = talker[tick]
        pcm[1] = newcomer[tick - started] if started is not None else 0.5 * torch.randn(1920)  # noise while held
        out = engine.step(pcm)
        recorded[0].append(out.tokens[0])
        if started is not None:
            recorded[1].append(out.tokens[1])
    assert started is not None and len(recorded[1]) >= 10
    alone0, _ = run_alone(lm, mimi, p1, SamplingConfig(seed=1), talker, kv_dtype)
    alone1, _ = run_alone(lm, mimi, p2, SamplingConfig(seed=2), newcomer[:len(recorded[1])], kv_dtype)
    assert torch.equal(torch.stack(recorded[0]), alone0)
    assert torch.equal(torch.stack(recorded[1]), alone1)
    # A held slot that is left is free again; starting a slot that holds nothing is refused.
    engine.leave(1)
    assert engine.begin_join(1, 2, p2, SamplingConfig(seed=2), hold=True) is True  # p2 is cached by now
    assert 1 not in engine.free_slots()
    engine.leave(1)
    assert 1 in engine.free_slots()
    with pytest.raises(ValueError, match="holds no conversation"):
        engine.start(1)


def test_padded_size_doubles_from_the_smallest_block_up_to_the_largest():
    assert [padded_size(n, 256) for n in (1, 64, 65, 125, 128, 129, 197, 256)] == [64, 64, 128, 128, 128, 256, 256, 256]
    assert padded_size(3, 4) == 4 and padded_size(150, 192) == 192


def test_no_prefill_block_is_captured_when_no_prompt_fits_the_scratch_ring():
    """A context shorter than a block (a short test model): every join prefills in place, so capturing
    blocks that could never run (and overflow the ring when captured) is skipped."""
    short = LMModel(dataclasses.replace(DEMO_LM, num_layers=1, context=64)).eval()
    graphs = prefill_graphs.PrefillGraphs(short, step_kernels(short), "model", 128, graphs=False)
    assert graphs.capturable_sizes() == [] and not graphs.fits(1)
    roomy = LMModel(dataclasses.replace(DEMO_LM, num_layers=1, context=400)).eval()
    graphs = prefill_graphs.PrefillGraphs(roomy, step_kernels(roomy), "model", 128, graphs=False)
    assert graphs.capturable_sizes() == [64, 128] and graphs.fits(200)


@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_scratch_blocks_padded_to_different_sizes_equal_joining_in_place(models, kv_dtype, monkeypatch):
    """The scratch prefill pads each block to the smallest captured size that holds it (here 12 and 8
    frames for an 18-frame prompt body in blocks of 12): the conversation then runs exactly as one joined in place."""
    monkeypatch.setattr(prefill_graphs, "SMALLEST_BLOCK", 2)
    lm, mimi = models
    prompt, sampling, audio = persona(lm, 4), SamplingConfig(seed=4), user_audio(4, 12)
    engine = Engine(lm, mimi, max_slots=2, kv_dtype=kv_dtype)
    engine.scratch_prefill = True
    engine.join_chunk_frames = 12
    padded = []
    original = prefill_graphs.padded_size
    monkeypatch.setattr(prefill_graphs, "padded_size", lambda frames, largest: padded.append(original(frames, largest)) or padded[-1])
    assert engine.begin_join(1, 2, prompt, sampling) is False
    while not engine.active[1]:
        engine.advance_joins(frame_budget=1)
    assert padded == [12, 8]
    tokens = torch.stack([engine.step(torch.stack([torch.zeros(1920), frame])).tokens[1] for frame in audio])
    alone, _ = run_alone(lm, mimi, prompt, sampling, audio, kv_dtype)
    assert torch.equal(tokens, alone)


def test_garbage_audio_in_one_slot_harms_nobody(models):
    """NaN, infinite and huge samples from one client: the others' frames are exactly unchanged, and the
    faulty slot still produces valid tokens and finite audio."""
    lm, mimi = models
    prompt = persona(lm, 1)
    clean = user_audio(5, 12)
    results = []
    for poison in (False, True):
        engine = Engine(lm, mimi, max_slots=2)
        engine.join(0, 1, prompt, SamplingConfig(seed=3))
        engine.join(1, 2, prompt, SamplingConfig(seed=4))
        outputs = []
        for tick, frame in enumerate(clean):
            pcm = torch.stack([frame, frame])
            if poison:
                pcm[1, ::3] = [float("nan"), float("inf"), -1e30][tick % 3]
            outputs.append(engine.step(pcm))
        results.append(outputs)
    for healthy, poisoned in zip(*results):
        assert torch.equal(healthy.tokens[0], poisoned.tokens[0])
        assert torch.equal(healthy.pcm[0], poisoned.pcm[0])
        assert poisoned.tokens[1].min() >= 0 and poisoned.tokens[1, 1:].max() < 2048
        assert torch.isfinite(poisoned.pcm[1]).all()


def counting(kernels, calls: dict):
    """``kernels`` (a ``StepKernels`` or ``StreamKernels``) with every function counting its calls in ``calls``."""
    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return run

    functions = {f.name: getattr(kernels, f.name) for f in dataclasses.fields(kernels)}
    functions = {name: fn for name, fn in functions.items() if callable(fn)}
    return dataclasses.replace(kernels, **{name: counted(name, fn) for name, fn in functions.items()})


def run_conversations(engine, prompt, audio):
    engine.join(0, 1, prompt, SamplingConfig(seed=3))
    engine.join(2, 3, prompt, SamplingConfig(seed=8, text_top_k=5))
    return [engine.step(torch.stack([frame] * 3)) for frame in audio]


def test_engine_runs_the_kernels_it_was_given_and_no_other(models):
    """Every function of the engine's kernel set runs in its steps and joins, as often as the layers need:
    no part of a step falls back to other code. Another engine over the same models, built with other
    kernels, leaves them untouched (nothing is stored on the shared modules)."""
    from personaplex.engine.kernels import EngineKernels, engine_kernels

    lm, mimi = models
    eager = engine_kernels(lm, mimi, "eager")
    calls: dict = {}
    kernels = EngineKernels("eager", counting(eager.lm, calls), counting(eager.codec, calls))
    engine = Engine(lm, mimi, max_slots=3, kernels=kernels)
    Engine(lm, mimi, max_slots=3, kernels="eager")  # a second engine over the same models
    prompt = persona(lm, 1)
    engine.join(0, 1, prompt, SamplingConfig(seed=3))
    joined = dict(calls)
    # The prompt's prefill runs the layer functions (blocks), nothing of the single-frame step's.
    assert joined.get("attention_input", 0) >= lm.config.num_layers and "write_and_attend" not in joined
    frames = 4
    plain = Engine(lm, mimi, max_slots=3, kernels="eager")
    plain.join(0, 1, prompt, SamplingConfig(seed=3))
    for _ in range(frames):
        plain.step(torch.zeros(3, 1920))
    assert calls == joined  # the other engine's steps ran none of this engine's kernels
    for _ in range(frames):
        engine.step(torch.zeros(3, 1920))
    stepped = {name: calls.get(name, 0) - joined.get(name, 0) for name in calls}
    layers = lm.config.num_layers
    assert stepped["write_and_attend"] == stepped["attention_output_and_ffn"] == frames * layers
    assert stepped["attention_input"] == frames * layers
    for name in ("embed", "forward_depth", "write_given", "commit", "encoder", "decoder"):
        assert stepped[name] == frames, name
    assert stepped["choose_tokens"] == frames  # the text token (the depth transformer samples inside)


def test_kernel_sets_differ_where_they_should(models):
    """"triton" swaps the single-frame attention for the Triton kernel, the layers' element-wise groups for
    the fused Triton kernels (the same layer functions, given other ops) and Mimi's attention for plain
    matmuls, and only those; "compile" is refused without CUDA (Inductor's CPU code rounds otherwise)."""
    from personaplex.layers.fused_ops import TRITON_OPS
    from personaplex.lm.fused import (
        attention_input, attention_output_and_ffn, gpu_write_and_attend, step_kernels, write_and_attend_reference,
    )
    from personaplex.lm.sampling_kernel import choose_tokens_fused

    lm, mimi = models
    eager = step_kernels(lm, "eager")
    assert eager.write_and_attend is write_and_attend_reference and not eager.reads_own_lengths
    if importlib.util.find_spec("triton") is not None:
        triton = step_kernels(lm, "triton")
        assert triton.write_and_attend is gpu_write_and_attend and triton.reads_own_lengths
        swapped = ("write_and_attend", "attention_input", "attention_output_and_ffn", "forward_depth", "embed")
        same = [f.name for f in dataclasses.fields(eager) if getattr(eager, f.name) == getattr(triton, f.name)]
        others = [f.name for f in dataclasses.fields(eager) if f.name not in ("name",) + swapped]
        assert sorted(same) == sorted(others)
        for name, function in [("attention_input", attention_input),
                               ("attention_output_and_ffn", attention_output_and_ffn)]:
            given = getattr(triton, name)  # the one implementation, given the Triton ops
            assert given.func == function and given.keywords == {"ops": TRITON_OPS}, name
        assert triton.forward_depth.func == lm.forward_depth
        assert triton.forward_depth.keywords == {"ops": TRITON_OPS, "choose": choose_tokens_fused}
    with pytest.raises(ValueError, match="CUDA"):
        step_kernels(lm, "compile")
    with pytest.raises(ValueError, match="kernel set"):
        step_kernels(lm, "fast")
    assert mimi.stream_kernels("eager").encoder == mimi.encoder_transformer.transformer.forward
    assert mimi.stream_kernels("math").encoder != mimi.stream_kernels("eager").encoder
    with pytest.raises(ValueError, match="stream kind"):
        mimi.stream_kernels("fast")


@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_triton_kernels_give_the_same_conversations(models, kv_dtype):
    """The "triton" set (decode attention in Triton's interpreter here, Mimi's attention as matmuls) steps
    a sampled batch like the eager set: same tokens, audio equal up to float rounding."""
    from conftest import require_triton_kernels

    require_triton_kernels()
    lm, mimi = models
    prompt = persona(lm, 1)
    audio = user_audio(6, 3)  # every kernel runs in each frame; in the interpreter a frame takes seconds
    runs = {}
    for name in ("eager", "triton"):
        engine = Engine(lm, mimi, max_slots=3, kv_dtype=kv_dtype, kernels=name)
        assert engine.kernels.name == name
        runs[name] = run_conversations(engine, prompt, audio)
    for plain, fast in zip(runs["eager"], runs["triton"]):
        assert torch.equal(plain.tokens[[0, 2]], fast.tokens[[0, 2]])
        torch.testing.assert_close(plain.pcm, fast.pcm, atol=1e-5, rtol=0)


def test_slot_sizing_leaves_room_for_the_prefix_cache_and_the_prefill_scratch(models, monkeypatch):
    """A server sizes its slots to the free GPU memory; what else it allocates later (the prefix cache, the
    scratch slot new personas prefill in, activations) must stay outside that count, or a join runs out of
    memory mid-conversation."""
    from types import SimpleNamespace

    lm, mimi = models
    per_slot = engine_module.slot_bytes(lm, mimi)
    scratch = per_slot * min(engine_module.SCRATCH_FRAMES, lm.config.context) // lm.config.context
    fake = SimpleNamespace(device=torch.device("cuda"), config=lm.config, dtype=lm.dtype)
    reserve, cache = 3 << 30, 2 << 30
    free = reserve + cache + scratch + 10 * per_slot
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, free))
    assert engine_module.slots_that_fit(fake, mimi) == 10
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free - 1, free))
    assert engine_module.slots_that_fit(fake, mimi) == 9


@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_slots_with_different_context_policies_step_together_past_the_context(models, kv_dtype):
    """Sliding and pin-persona slots in one batch, each 2.5 contexts long, one from the prefix cache: every
    slot equals its conversation run alone under its policy; the policies agree until the context is full."""
    lm, mimi = models
    p1, p2 = persona(lm, 1), persona(lm, 2)
    frames = int(2.5 * CONTEXT)
    plan = [(p1, SamplingConfig(seed=11), "sliding", 1), (p2, SamplingConfig(seed=12), "pin-persona", 2),
            (p1, SamplingConfig(greedy=True), "pin-persona", 3)]
    engine = Engine(lm, mimi, max_slots=3, kv_dtype=kv_dtype)
    cached = [engine.join(slot, slot + 1, prompt, sampling, context_policy=policy)
              for slot, (prompt, sampling, policy, _) in enumerate(plan)]
    assert cached == [False, False, True]
    audio = [user_audio(seed, frames) for *_, seed in plan]
    outputs = [engine.step(torch.stack([a[t] for a in audio])) for t in range(frames)]
    for slot, (prompt, sampling, policy, _) in enumerate(plan):
        alone, _ = run_alone(lm, mimi, prompt, sampling, audio[slot], kv_dtype, policy)
        assert torch.equal(torch.stack([o.tokens[slot] for o in outputs]), alone), (slot, policy)

    sliding, _ = run_alone(lm, mimi, p2, SamplingConfig(seed=12), audio[1], kv_dtype, "sliding")
    pinned = torch.stack([o.tokens[1] for o in outputs])
    full = CONTEXT - 1 - p2.num_steps  # steps before the first query at position C-1
    assert torch.equal(sliding[:full], pinned[:full])
    assert not torch.equal(sliding[full:], pinned[full:])


@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_triton_kernels_step_pinned_and_sliding_slots_like_eager_past_the_context(models, kv_dtype):
    """The Triton decode attention's pinned path (second query for the prompt's entries) in a batch of a
    pin-persona and a sliding slot, 1.6 contexts long: same tokens as the eager set.

    Only the decode attention differs from the eager set here: the pinned path is all in that kernel, and the
    whole "triton" set (which the test above steps) takes seconds a frame in Triton's interpreter."""
    from conftest import require_triton_kernels

    require_triton_kernels()
    _, mimi = models
    # A shorter ring than the other tests' (the prompt's 19 frames still fit): 1.6 contexts wrap it past its
    # pinned part.
    context = 32
    lm = randomize_(LMModel(dataclasses.replace(DEMO_LM, context=context, num_layers=2)), seed=1)
    lm = lm.eval().requires_grad_(False)
    frames = int(1.6 * context)
    audio = [user_audio(seed, frames) for seed in (7, 8)]
    triton_attention = triton_attention_only(lm, mimi)
    runs = {}
    for name, kernels in (("eager", "eager"), ("triton", triton_attention)):
        engine = Engine(lm, mimi, max_slots=2, kv_dtype=kv_dtype, kernels=kernels)
        engine.join(0, 1, persona(lm, 1), SamplingConfig(seed=21), context_policy="pin-persona")
        engine.join(1, 2, persona(lm, 2), SamplingConfig(greedy=True), context_policy="sliding")
        runs[name] = [engine.step(torch.stack([a[t] for a in audio])) for t in range(frames)]
    for plain, fast in zip(runs["eager"], runs["triton"]):
        assert torch.equal(plain.tokens, fast.tokens)
        torch.testing.assert_close(plain.pcm, fast.pcm, atol=1e-5, rtol=0)


def test_a_head_dim_that_is_not_a_power_of_two_runs_through_the_triton_kernels(models):
    """48-wide heads (192 / 4) through the engine's "triton" set, FP8 rings, a pin-persona and a sliding slot:
    the decode attention pads the heads inside the kernel and steps like the eager set."""
    from conftest import require_triton_kernels

    require_triton_kernels()
    _, mimi = models
    config = dataclasses.replace(DEMO_LM, context=CONTEXT, num_layers=1, dim=192, num_heads=4)
    assert config.head_dim == 48
    lm = randomize_(LMModel(config), seed=3).eval().requires_grad_(False)
    frames = 4  # the whole "triton" set: seconds a frame in Triton's interpreter
    audio = [user_audio(seed, frames) for seed in (9, 10)]
    runs = {}
    for name in ("eager", "triton"):
        engine = Engine(lm, mimi, max_slots=2, kv_dtype="fp8", kernels=name)
        engine.join(0, 1, persona(lm, 1), SamplingConfig(seed=3), context_policy="pin-persona")
        engine.join(1, 2, persona(lm, 2), SamplingConfig(seed=4))
        runs[name] = [engine.step(torch.stack([a[t] for a in audio])) for t in range(frames)]
    for plain, fast in zip(runs["eager"], runs["triton"]):
        assert torch.equal(plain.tokens, fast.tokens)
        torch.testing.assert_close(plain.pcm, fast.pcm, atol=1e-5, rtol=0)


def test_an_unknown_context_policy_is_refused(models):
    lm, mimi = models
    engine = Engine(lm, mimi, max_slots=1)
    with pytest.raises(ValueError, match="context policy"):
        engine.join(0, 1, persona(lm, 1), SamplingConfig(seed=1), context_policy="forever")
    assert engine.free_slots() == [0]


def counted_launches(monkeypatch) -> dict:
    """Launches of every Triton kernel of the project, by kernel name, from now on."""
    from personaplex.layers import decode_attention, fused_ops
    from personaplex.lm import sampling_kernel

    launches: dict = {}
    for module in (decode_attention, fused_ops, sampling_kernel):
        for name in dir(module):
            kernel = getattr(module, name)
            if name.endswith("_kernel") and hasattr(kernel, "run"):
                def run(*args, _name=name, _run=kernel.run, **kwargs):
                    launches[_name] = launches.get(_name, 0) + 1
                    return _run(*args, **kwargs)
                monkeypatch.setattr(kernel, "run", run)
    return launches


@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_the_triton_set_launches_its_kernels_in_every_step(models, kv_dtype, monkeypatch):
    """No silent fallback to PyTorch: every frame of a "triton" engine launches the fused kernels as often
    as its layers need them (temporal layers, depth layers and the token choice per depth step); an eager
    engine none."""
    from conftest import require_triton_kernels

    require_triton_kernels()
    lm, mimi = models
    launches = counted_launches(monkeypatch)
    eager = Engine(lm, mimi, max_slots=2, kv_dtype=kv_dtype, kernels="eager")
    eager.join(0, 1, persona(lm, 1), SamplingConfig(seed=3))
    for _ in range(2):
        eager.step(torch.zeros(2, 1920))
    assert launches == {}
    engine = Engine(lm, mimi, max_slots=2, kv_dtype=kv_dtype, kernels="triton")
    engine.join(0, 1, persona(lm, 1), SamplingConfig(seed=3))
    launches.clear()
    frames = 3
    for _ in range(frames):
        engine.step(torch.zeros(2, 1920))
    layers, depth_layers = lm.config.num_layers, lm.config.depformer_num_layers
    depth = engine.config.agent_codebooks * depth_layers  # depth layers run per frame
    codec_layers = mimi.config.transformer.num_layers * 2  # Mimi's encoder and decoder transformers
    assert launches == {
        "_qkv_heads_kernel": frames * (layers + codec_layers),  # one launch per layer call (Mimi's: 2 frames)
        "_chunk_kernel": frames * layers,
        "_merge_kernel": frames * layers,
        # temporal and depth: the first norm, then two adds + norms a layer but the last layer's final add
        "_rms_norm_kernel": frames * (2 * layers + 2 * depth),
        "_silu_mul_kernel": frames * (layers + depth),
        "_depth_attention_kernel": frames * depth,
        "_choose_kernel": frames * engine.config.agent_codebooks,  # one per depth step
        "_embedding_sum_kernel": frames,
    }
