"""Delay patterns other than PersonaPlex's (largest delay above 1) follow the reference ``LMGen`` step.

The reference keeps ``max_delay + 3`` token columns and, from step ``max_delay + 1`` on, returns the
frame ``max_delay`` steps back: channel k read at column ``offset - max_delay + delay[k]``. The
definition below is written out step by step from that description, one slot at a time, with plain
Python indexing; the model's own arithmetic (checked against the golden fixtures elsewhere) supplies
the logits, so what is compared here is the token bookkeeping, token by token.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaplex.checkpoint import build_lm
from personaplex.config import TINY_LM
from personaplex.lm.generator import Generator
from personaplex.random_weights import randomize_

# text, agent codebooks 0..7, user codebooks 0..7
PATTERNS = {
    "all delayed by 2": (0, 0, 2, 2, 2, 2, 2, 2, 2, 0, 2, 2, 2, 2, 2, 2, 2),
    "mixed up to 3": (0, 0, 1, 2, 3, 1, 2, 3, 1, 0, 1, 2, 3, 3, 2, 1, 1),
    "text delayed": (2, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1),
    "personaplex": TINY_LM.delays,
}


class ReferenceStep:
    """The reference ``LMGen`` for one conversation: its ``step`` as described, greedy decoding."""

    def __init__(self, model):
        cfg = model.config
        self.model, self.delays, self.max_delay = model, list(cfg.delays), cfg.max_delay
        self.columns = cfg.max_delay + 3
        self.initial = [cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q
        self.cache = [[-2] * self.columns for _ in self.delays]  # -2: never generated
        self.provided = [[False] * self.columns for _ in self.delays]
        self.offset = 0
        self.kv = model.new_state(1)

    def step(self, given: list[int]) -> tuple[list[int] | None, torch.Tensor | None]:
        """given: one token per channel, -1 where free. Returns (frame or None, text logits or None)."""
        o, C = self.offset, self.columns
        for k, (token, delay) in enumerate(zip(given, self.delays)):
            if token >= 0:
                self.cache[k][(o + delay) % C], self.provided[k][(o + delay) % C] = token, True
        for k, delay in enumerate(self.delays):
            if o <= delay:
                self.cache[k][o % C], self.provided[k][o % C] = self.initial[k], True
        if o == 0:  # the first step runs no model
            for k in range(len(self.delays)):
                self.cache[k][0] = self.initial[k]
            self.offset = 1
            return None, None
        model_input = [self.cache[k][(o - 1) % C] for k in range(len(self.delays))]
        target = [self.cache[k][o % C] for k in range(len(self.delays))]
        forced = [self.provided[k][o % C] for k in range(len(self.delays))]
        embeddings = self.model.embed(torch.tensor([[model_input]]))
        out, text_logits = self.model.forward_temporal(embeddings, torch.tensor([o - 1]), self.kv)
        sampled_text = int(text_logits[0, 0].float().argmax())
        text = target[0] if forced[0] else sampled_text
        forced_audio = torch.tensor([[t if f else -1 for t, f in zip(target[1:], forced[1:])]])
        depth = self.model.forward_depth(out[:, 0], torch.tensor([text]), forced_audio, self.model.config.dep_q)
        audio = depth.tokens[0]  # every codebook the depth transformer has, the user's included
        for k in range(len(self.delays)):
            self.provided[k][(o - 1) % C] = False
        chosen = [sampled_text] + audio.tolist()
        for k in range(len(self.delays)):
            if not self.provided[k][o % C]:
                self.cache[k][o % C] = chosen[k]
        self.offset += 1
        if o <= self.max_delay:
            return None, text_logits[0, 0]
        frame = [self.cache[k][(o - self.max_delay + delay) % C] for k, delay in enumerate(self.delays)]
        return frame, text_logits[0, 0]


def tiny_model(delays: tuple[int, ...]):
    config = dataclasses.replace(TINY_LM, delays=delays)
    return randomize_(build_lm(config, "cpu"), seed=5).eval()


def partly_forced_frames(seed: int, steps: int, config) -> torch.Tensor:
    """User codes every frame; the text and some agent codebooks forced now and then, the rest free."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, config.card, (steps, config.num_channels), generator=g)
    frames[:, 0] = torch.randint(0, config.text_card, (steps,), generator=g)
    free = torch.rand(steps, config.num_channels, generator=g) < 0.8
    free[:, 1 + config.agent_codebooks :] = False
    return torch.where(free, -1, frames)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_steps_follow_the_reference(pattern):
    """Partly forced frames, longer than the tiny context (24): every returned frame, its validity and the
    text logits equal the reference's, step by step."""
    model = tiny_model(PATTERNS[pattern])
    frames = partly_forced_frames(1, 30, model.config)
    reference = ReferenceStep(model)
    generator = Generator(model)
    assert generator.new_state(1).cache.shape[2] == model.config.max_delay + 3
    gen_state, lm_state = generator.new_state(1), model.new_state(1)
    with torch.inference_mode():
        reference.step(frames[0].tolist())  # the reference's step 0 is folded into our reset
        generator.reset(gen_state, torch.tensor([True]), frames[:1])
        returned = 0
        for t in range(1, frames.shape[0]):
            expected, expected_logits = reference.step(frames[t].tolist())
            result = generator.step(gen_state, lm_state, frames[t : t + 1])
            assert bool(result.valid[0]) == (expected is not None), t
            if expected is not None:
                assert result.tokens[0].tolist() == expected, t
                returned += 1
            else:
                assert (result.tokens == -1).all()
            torch.testing.assert_close(result.text_logits[0], expected_logits, atol=1e-5, rtol=0)
    assert returned == frames.shape[0] - 1 - model.config.max_delay


@pytest.mark.parametrize("pattern", ["all delayed by 2", "mixed up to 3"])
def test_prefilled_prompt_then_steps_follow_the_reference(pattern):
    """A fully forced prompt taken in one block (``Generator.prefill``), then free-running steps with the
    user's codes forced: the reference takes all of them one by one; the outputs match token by token."""
    model = tiny_model(PATTERNS[pattern])
    config = model.config
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, config.card, (9, config.num_channels), generator=g)
    prompt[:, 0] = torch.randint(0, config.text_card, (9,), generator=g)
    users = torch.full((20, config.num_channels), -1)
    users[:, 1 + config.agent_codebooks :] = torch.randint(0, config.card, (20, config.agent_codebooks), generator=g)
    reference = ReferenceStep(model)
    generator = Generator(model)
    gen_state, lm_state = generator.new_state(1), model.new_state(1)
    with torch.inference_mode():
        for frame in prompt:
            reference.step(frame.tolist())
        expected = [reference.step(frame.tolist()) for frame in users]
        generator.reset(gen_state, torch.tensor([True]), prompt[:1])
        generator.prefill(gen_state, lm_state, prompt[None, 1:])
        got = [generator.step(gen_state, lm_state, frame[None]) for frame in users]
    for t, ((frame, logits), result) in enumerate(zip(expected, got)):
        assert frame is not None and bool(result.valid[0]), t
        assert result.tokens[0].tolist() == frame, t
        torch.testing.assert_close(result.text_logits[0], logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pattern", ["personaplex", "mixed up to 3"])
def test_free_user_stream_is_predicted_like_the_reference(pattern):
    """Nothing forced after the first frame: by default the depth transformer predicts all ``dep_q``
    codebooks, the user's included, as the reference's does; every returned frame is complete and equal
    to the reference's token by token. Limited to the agent's codebooks, the user's come back as -1."""
    model = tiny_model(PATTERNS[pattern])
    config = model.config
    first = partly_forced_frames(3, 1, config)
    free = torch.full((12, config.num_channels), -1)
    reference = ReferenceStep(model)
    generator = Generator(model)
    gen_state, lm_state = generator.new_state(1), model.new_state(1)
    with torch.inference_mode():
        reference.step(first[0].tolist())
        generator.reset(gen_state, torch.tensor([True]), first)
        frames = []
        for frame in free:
            expected, _ = reference.step(frame.tolist())
            result = generator.step(gen_state, lm_state, frame[None])
            if expected is not None:
                assert result.tokens[0].tolist() == expected
                frames.append(result.tokens[0])
        assert len(frames) == free.shape[0] - config.max_delay
        assert (torch.stack(frames) >= 0).all()  # user codebooks included

        for _ in range(config.max_delay + 1):  # until every channel of the returned frame comes from these steps
            agent_only = generator.step(gen_state, lm_state, free[:1], depth_steps=config.agent_codebooks)
    user = slice(1 + config.agent_codebooks, config.num_channels)
    assert (agent_only.tokens[0, :user.start] >= 0).all() and (agent_only.tokens[0, user] == -1).all()


def test_voice_files_carry_the_token_buffer_of_the_delay_pattern(tmp_path):
    """A saved voice's token buffer has the model's max_delay + 3 columns; one made for another pattern
    is refused with the shapes named."""
    from safetensors.torch import save_file

    from personaplex.persona import VoicePromptError, load_saved_voice

    config = dataclasses.replace(TINY_LM, delays=PATTERNS["mixed up to 3"])
    embeddings = torch.zeros(4, 1, 1, config.dim)
    for name, columns in (("ok", 6), ("bad", 4)):
        cache = torch.zeros(1, 17, columns, dtype=torch.long)
        save_file({"embeddings": embeddings, "cache": cache}, str(tmp_path / f"{name}.safetensors"))
    assert load_saved_voice(tmp_path / "ok.safetensors", config).cache.shape == (17, 6)
    with pytest.raises(VoicePromptError, match=r"cache has shape \[1, 17, 4\], expected \[1, 17, 6\]"):
        load_saved_voice(tmp_path / "bad.safetensors", config)
