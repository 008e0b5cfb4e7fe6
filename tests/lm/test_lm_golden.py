"""The LM against the reference recordings: teacher-forced math, then the generator state machine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from personaplex.config import LMConfig
from personaplex.lm.generator import Generator
from personaplex.loading import load_lm

LOGIT_TOL = 1e-5


@pytest.fixture(scope="module")
def lm_config(golden_config) -> LMConfig:
    return LMConfig.from_reference_kwargs(golden_config["lm"]["config"])


@pytest.fixture(scope="module")
def lm(golden, lm_config):
    return load_lm(golden / golden_config_file(golden), lm_config, device="cpu", dtype=torch.float32)


def golden_config_file(golden) -> str:
    return json.loads((golden / "tiny_config.json").read_text())["lm"]["file"]


@pytest.fixture(scope="module")
def session(golden) -> dict[str, torch.Tensor]:
    return load_file(golden / "golden_lm_session.safetensors")


@pytest.fixture(scope="module")
def user_start(golden) -> int:
    """First step of the user phase (the prompt ends just before it)."""
    return json.loads((golden / "golden_lm_session.json").read_text())["phases"]["user"]["first_step"]


def forced_column(session, step: int) -> torch.Tensor:
    """The channel column (text, agent, user codebooks) the caller passed at ``step`` (-1 = not given)."""
    return torch.cat([
        session["step_forced_text"][step : step + 1],
        session["step_forced_agent"][step],
        session["step_forced_user"][step],
    ])


def test_tiny_lm_preset_is_the_reference_fixture_layout(reference_fixture_config):
    """The built-in "tiny" LM is the reference fixtures' (not necessarily the fixture set under test)."""
    from personaplex.config import TINY_LM

    assert LMConfig.from_reference_kwargs(reference_fixture_config["lm"]["config"]) == TINY_LM


def test_teacher_forced_temporal_and_depth(lm, session, user_start):
    """Feed the recorded model inputs; every computed head must match the recorded logits."""
    steps = session["step_computed"].nonzero()[:, 0].tolist()
    state = lm.new_state(1)
    for step in steps:
        tokens = session["step_model_input_tokens"][step].view(1, 1, -1)
        out, text_logits = lm.forward_temporal(lm.embed(tokens), torch.tensor([step - 1]), state)
        torch.testing.assert_close(out[0, 0], session["step_transformer_out"][step], atol=LOGIT_TOL, rtol=0)
        torch.testing.assert_close(text_logits[0, 0], session["step_text_logits"][step], atol=LOGIT_TOL, rtol=0)
        prev = session["step_depformer_prev_tokens"][step]
        # Force every depth step with the recorded token so that each step sees the recorded input.
        forced = torch.cat([prev[1:], torch.tensor([0])]).view(1, -1)
        depth = lm.forward_depth(out[:, 0], prev[:1], forced, lm.config.dep_q, return_logits=True)
        logits = depth.logits[0]
        top2 = logits.topk(2, dim=-1)
        torch.testing.assert_close(top2.values, session["step_audio_logits_top2_values"][step], atol=LOGIT_TOL, rtol=0)
        assert torch.equal(top2.indices, session["step_audio_logits_top2_indices"][step])
        torch.testing.assert_close(logits.logsumexp(-1), session["step_audio_logsumexp"][step], atol=LOGIT_TOL, rtol=0)
        assert torch.equal(logits.argmax(-1), session["step_raw_sampled_audio"][step])
        assert text_logits[0, 0].argmax() == session["step_raw_sampled_text"][step]
        if step >= user_start:
            torch.testing.assert_close(logits, session["user_audio_logits"][step - user_start], atol=LOGIT_TOL, rtol=0)


def test_prompt_end_kv_rings(lm, session, user_start):
    """After the prompt frames the rings hold exactly the reference's keys and values."""
    state = lm.new_state(1)
    for step in range(1, user_start):
        tokens = session["step_model_input_tokens"][step].view(1, 1, -1)
        lm.forward_temporal(lm.embed(tokens), torch.tensor([step - 1]), state)
    for layer in range(lm.config.num_layers):
        torch.testing.assert_close(state.keys[layer, 0], session[f"prompt_end_kv_layer{layer}_keys"], atol=LOGIT_TOL, rtol=0)
        torch.testing.assert_close(state.values[layer, 0], session[f"prompt_end_kv_layer{layer}_values"], atol=LOGIT_TOL, rtol=0)


def comparable_cache(cache: torch.Tensor, provided: torch.Tensor, offset_after: int) -> torch.Tensor:
    """Cache entries whose value is determined: provided ones and the last two written columns.

    Other entries are stale leftovers (from warm-up in the reference) that are never read.
    """
    keep = provided.clone()
    columns = cache.shape[-1]
    keep[:, (offset_after - 1) % columns] = True
    keep[:, (offset_after - 2) % columns] = True
    return torch.where(keep, cache, -100)


def test_generator_state_machine(lm, session):
    """Drive ``step`` with the recorded forcing: outputs and token buffers match at every step."""
    generator = Generator(lm)
    gen_state = generator.new_state(1)
    lm_state = lm.new_state(1)
    n_steps = session["step_phase"].shape[0]
    generator.reset(gen_state, torch.tensor([True]), forced_column(session, 0).view(1, -1))
    assert torch.equal(gen_state.provided[0], _provided_after_step0(session, lm.config.delays))
    for step in range(1, n_steps):
        result = generator.step(gen_state, lm_state, forced_column(session, step).view(1, -1), depth_steps=lm.config.dep_q)
        expected_none = bool(session["step_out_is_none"][step])
        assert bool(result.valid[0]) == (not expected_none), step
        if not expected_none:
            assert torch.equal(result.tokens[0], session["step_out_tokens"][step]), step
        offset_after = int(session["step_offset_before"][step]) + 1
        assert int(gen_state.offset[0]) == offset_after
        assert torch.equal(gen_state.provided[0], session["step_provided_after"][step]), step
        expected_cache = comparable_cache(session["step_cache_after"][step], session["step_provided_after"][step], offset_after)
        actual_cache = comparable_cache(gen_state.cache[0], gen_state.provided[0], offset_after)
        assert torch.equal(actual_cache, expected_cache), step
        torch.testing.assert_close(result.text_logits[0], session["step_text_logits"][step], atol=LOGIT_TOL, rtol=0)


def _provided_after_step0(session, delays) -> torch.Tensor:
    # The fixture does not record step 0's state; derive it from step 1's forcing rule: column 0 is
    # all initial, column 1 holds the delayed channels forced at step 0.
    provided = torch.zeros_like(session["step_provided_after"][0])  # [channels, cache columns]
    provided[:, 0] = True
    forced = forced_column(session, 0)
    provided[:, 1] = (forced >= 0) & (torch.tensor(delays) > 0)
    return provided


def test_skipping_user_depth_steps_changes_nothing(lm, session):
    """With user codebooks forced, computing only the agent codebooks returns the same tokens."""
    outputs = {}
    for depth_steps in (lm.config.dep_q, lm.config.agent_codebooks):
        generator = Generator(lm)
        gen_state, lm_state = generator.new_state(1), lm.new_state(1)
        generator.reset(gen_state, torch.tensor([True]))
        tokens = []
        for step in range(1, session["step_phase"].shape[0]):
            result = generator.step(gen_state, lm_state, forced_column(session, step).view(1, -1), depth_steps=depth_steps)
            tokens.append(torch.where(result.valid[:, None], result.tokens, -100))
        outputs[depth_steps] = torch.cat(tokens)
    assert torch.equal(outputs[lm.config.dep_q], outputs[lm.config.agent_codebooks])
