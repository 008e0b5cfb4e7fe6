"""Conversations longer than the model's context: the KV rings slide exactly as the reference's cache does.

The reference keeps the last C entries of each layer's keys and values and, once its cache has wrapped,
never attends to the oldest one: every frame sees the C-1 most recent positions, itself included. Here
that definition is written out directly (full history, banded causal mask, no ring) and compared, frame
by frame, with the generator stepping through KV rings of capacity C, for three times the context.
"""

from __future__ import annotations

import math

import torch

from personaplex.config import LMConfig
from personaplex.layers.rope import apply_rope, rotation_for
from personaplex.lm.generator import Generator
from personaplex.loading import load_lm


def windowed_reference(model, inputs: torch.Tensor, window: int | None, pinned: int = 0) -> torch.Tensor:
    """The temporal transformer over a whole history at once: inputs [T, dim] (frame t at position t) ->
    outputs [T, dim]. Frame t attends to positions max(0, t - window + 1) .. t (``window`` None: all).

    ``pinned`` P > 0 (pin-persona, with ``window`` = C-1): positions below P are always seen, scored with
    the query rotated to min(t, C-2); later ones from max(P, t - (C-1-P) + 1) on."""
    cfg = model.config
    steps = inputs.shape[0]
    heads, head_dim = cfg.num_heads, cfg.head_dim
    positions = torch.arange(steps)
    query, key = positions[:, None], positions[None, :]
    visible = key <= query
    if window is not None:
        visible &= (key > query - (window - pinned)) | (key < pinned)
    rotation = rotation_for(positions[None], head_dim, cfg.max_period)
    capacity = None if window is None else window + 1
    pinned_rotation = rotation_for(positions[None].clamp(max=(capacity or steps) - 2), head_dim, cfg.max_period)
    x = inputs[None].float()
    for layer in model.transformer.layers:
        projected = layer.norm1(x) @ layer.self_attn.in_proj_weight.float().T  # [1, T, 3 * H * D]
        q, k, v = projected.view(1, steps, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # each [1, H, T, D]
        q_pinned = apply_rope(q, pinned_rotation)
        q, k = apply_rope(q, rotation), apply_rope(k, rotation)
        scores = torch.where(key < pinned, q_pinned @ k.transpose(-1, -2), q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(1, steps, heads * head_dim)
        x = x + layer.self_attn.out_proj(attended)
        x = x + layer.gating(layer.norm2(x))
    return x[0]


def record_temporal_calls(model) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Every call of the temporal transformer: (inputs [B, T, dim], first position [B], outputs [B, T, dim])."""
    calls = []

    def hook(module, args, output):
        calls.append((args[0].detach().clone(), args[1].detach().clone(), output.detach().clone()))

    return calls, model.transformer.register_forward_hook(hook)


def test_three_contexts_of_conversation_equal_the_reference_window(golden, golden_config):
    config = LMConfig.from_reference_kwargs(golden_config["lm"]["config"])
    model = load_lm(golden / golden_config["lm"]["file"], config, dtype=torch.float32)
    capacity = config.context
    prompt_frames, free_frames = 15, 3 * capacity + 5  # a fully forced prompt (prefilled), then conversation
    assert prompt_frames + free_frames > 3 * capacity

    rng = torch.Generator().manual_seed(19)
    prompt = torch.randint(0, 100, (1, prompt_frames, config.num_channels), generator=rng)
    user = torch.full((free_frames, config.num_channels), -1)
    user[:, 1 + config.agent_codebooks:] = torch.randint(0, config.card, (free_frames, config.agent_codebooks),
                                                         generator=rng)

    generator = Generator(model)
    gen_state, lm_state = generator.new_state(1), model.new_state(1)
    rings_before = [(t.shape, t.data_ptr()) for t in lm_state.tensors()]
    calls, handle = record_temporal_calls(model)
    try:
        generator.prefill(gen_state, lm_state, prompt)
        results = [generator.step(gen_state, lm_state, frame[None]) for frame in user]
    finally:
        handle.remove()
    # Constant memory: the same ring tensors, never grown or reallocated, after 3x the context.
    assert [(t.shape, t.data_ptr()) for t in lm_state.tensors()] == rings_before
    assert lm_state.keys.shape[3] == capacity

    # The history the model was fed, in order, at consecutive positions from 0.
    inputs = torch.cat([x[0] for x, _, _ in calls])
    starts = [int(p[0]) for _, p, _ in calls]
    lengths = [x.shape[1] for x, _, _ in calls]
    assert starts == [sum(lengths[:i]) for i in range(len(calls))]
    assert inputs.shape[0] == prompt_frames + free_frames
    ours = torch.cat([out[0] for _, _, out in calls])

    reference = windowed_reference(model, inputs, window=capacity - 1)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    # The window matters: attending to the whole history gives other outputs once the ring has wrapped.
    unbounded = windowed_reference(model, inputs, window=None)
    assert torch.allclose(unbounded[:capacity - 1], reference[:capacity - 1], atol=1e-4)
    assert (unbounded[capacity:] - reference[capacity:]).abs().amax() > 1e-2

    # Token by token: the text token (greedy: the argmax of the logits) and the agent's audio codebooks
    # that the depth transformer chooses from the reference's output equal those chosen from ours.
    reference_out = model.out_norm(reference[prompt_frames:][:, None])[:, 0]
    reference_text = model.text_linear(reference_out).argmax(dim=-1)
    for t, result in enumerate(results):
        assert int(result.text_logits[0].argmax()) == int(reference_text[t]), f"text token differs at frame {t}"
        no_forcing = torch.full((1, config.agent_codebooks), -1)
        ours_audio = model.forward_depth(result.transformer_out, reference_text[t:t + 1], no_forcing,
                                         config.agent_codebooks).tokens
        reference_audio = model.forward_depth(reference_out[t:t + 1], reference_text[t:t + 1], no_forcing,
                                              config.agent_codebooks).tokens
        assert torch.equal(ours_audio, reference_audio), f"audio tokens differ at frame {t}"


def run_conversation(model, prompt: torch.Tensor, user: torch.Tensor, pin: bool):
    """Prefill ``prompt`` [1, P, channels], then step ``user`` frames greedily, pinning the prompt or not.
    Returns (temporal transformer calls, step results, LM state)."""
    generator = Generator(model)
    gen_state, lm_state = generator.new_state(1), model.new_state(1)
    calls, handle = record_temporal_calls(model)
    try:
        generator.prefill(gen_state, lm_state, prompt)
        if pin:
            lm_state.pinned = torch.tensor([prompt.shape[1]])
        results = [generator.step(gen_state, lm_state, frame[None]) for frame in user]
    finally:
        handle.remove()
    return calls, results, lm_state


def conversation_inputs(config, prompt_frames: int, free_frames: int, seed: int):
    rng = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 100, (1, prompt_frames, config.num_channels), generator=rng)
    user = torch.full((free_frames, config.num_channels), -1)
    user[:, 1 + config.agent_codebooks:] = torch.randint(0, config.card, (free_frames, config.agent_codebooks),
                                                         generator=rng)
    return prompt, user


def test_pinned_persona_stays_in_the_rings_and_attended_for_three_contexts(golden, golden_config):
    from personaplex.layers.kv_ring import lowest_visible, ring_positions, ring_visibility

    config = LMConfig.from_reference_kwargs(golden_config["lm"]["config"])
    model = load_lm(golden / golden_config["lm"]["file"], config, dtype=torch.float32)
    capacity, prompt_frames = config.context, 9
    prompt, user = conversation_inputs(config, prompt_frames, 3 * capacity + 5, seed=7)

    generator = Generator(model)
    gen_state, lm_state = generator.new_state(1), model.new_state(1)
    generator.prefill(gen_state, lm_state, prompt)
    persona_keys = lm_state.keys[:, :, :, :prompt_frames].clone()
    calls, results, pinned_state = run_conversation(model, prompt, user, pin=True)
    # The prompt's entries are untouched after three contexts of conversation...
    assert torch.equal(pinned_state.keys[:, :, :, :prompt_frames], persona_keys)
    # ...and every query still sees them, with C-1 keys in all, none farther than the context.
    last = prompt_frames + len(user) - 1
    pinned = pinned_state.pinned
    positions = ring_positions(torch.tensor([last]), capacity, pinned)
    query = torch.tensor([[last]])
    seen = positions[0][ring_visibility(positions, query, lowest_visible(query, capacity, pinned), pinned)[0, 0, 0]]
    assert set(range(prompt_frames)) <= set(seen.tolist()) and len(seen) == capacity - 1
    assert (last - seen[seen >= prompt_frames]).max() <= capacity - 2

    # The model's outputs equal the pin-persona definition written out over the whole history.
    inputs = torch.cat([x[0] for x, _, _ in calls])
    ours = torch.cat([out[0] for _, _, out in calls])
    reference = windowed_reference(model, inputs, window=capacity - 1, pinned=prompt_frames)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    sliding = windowed_reference(model, inputs, window=capacity - 1)
    assert (sliding[capacity:] - reference[capacity:]).abs().amax() > 1e-2  # pinning changes what is seen


def test_both_policies_give_the_same_tokens_until_the_context_is_full(golden, golden_config):
    config = LMConfig.from_reference_kwargs(golden_config["lm"]["config"])
    model = load_lm(golden / golden_config["lm"]["file"], config, dtype=torch.float32)
    capacity, prompt_frames = config.context, 9
    prompt, user = conversation_inputs(config, prompt_frames, 2 * capacity, seed=8)
    _, sliding, _ = run_conversation(model, prompt, user, pin=False)
    _, pinned, _ = run_conversation(model, prompt, user, pin=True)
    before_full = capacity - 1 - prompt_frames  # steps whose query position is at most C-2
    for t in range(before_full):
        assert torch.equal(sliding[t].tokens, pinned[t].tokens), f"frame {t}"
        # Same keys, same positions: only the attention kernel's rounding differs (pinned scores use two products).
        torch.testing.assert_close(sliding[t].text_logits, pinned[t].text_logits, rtol=1e-5, atol=1e-5)
    assert max((a.text_logits - b.text_logits).abs().max() for a, b in zip(sliding[before_full:], pinned[before_full:])) > 1e-2
