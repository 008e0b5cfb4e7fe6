"""The PersonaPlex "hybrid system prompt": a voice and a text role, forced into the LM before talking.

Phases, each one forced frame per LM step (all 17 channels given, so nothing sampled survives):

1. voice:    agent audio = Mimi codes of the voice recording, text = PAD, user = sine tokens
2. silence:  6 frames (0.5 s at 12.5 Hz, rounded down) of agent silence, text = PAD, user = sine
3. text:     one text-prompt token per frame, agent silence, user sine
4. silence:  as 2

A voice may also come as saved input embeddings (the reference ``.pt`` format): phase 1 then feeds
the stored embeddings straight to the temporal transformer and restores the saved token buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import FRAME_RATE, LMConfig
from .errors import PersonaplexError

# Mimi codes (codebooks 0..7) of a silent frame and of a 440 Hz sine frame, as hard-coded in the
# reference; they are properties of the real Mimi weights.
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
SILENCE_FRAMES = int(0.5 * FRAME_RATE)


class VoicePromptError(PersonaplexError):
    """A voice prompt file is missing, unsafe or malformed."""


@dataclass
class SavedVoice:
    """A voice prompt as saved input embeddings (reference ``.pt`` layout).

    embeddings: [N-1, dim] summed input embeddings of voice steps 1..N-1;
    cache: [channels, 4] the generator token buffer after the voice phase.
    """

    embeddings: torch.Tensor
    cache: torch.Tensor

    @property
    def num_frames(self) -> int:
        """N: the voice-prompt frames the embeddings stand for (step 0 has no embedding)."""
        return self.embeddings.shape[0] + 1


def load_saved_voice(path: str | Path, config: LMConfig) -> SavedVoice:
    """Read a ``.pt`` (zip written by ``torch.save``) or ``.safetensors`` voice file, safely.

    ``.pt`` files go through torch's restricted unpickler (``weights_only=True``): only tensors and
    plain containers load, arbitrary objects are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise VoicePromptError(f"voice file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VoicePromptError(f"cannot read voice file {path}: {exc}") from exc
    if not isinstance(data, dict) or not {"embeddings", "cache"} <= set(data):
        raise VoicePromptError(f"{path} is not a voice file: expected tensors 'embeddings' and 'cache'")
    embeddings, cache = data["embeddings"], data["cache"]
    if embeddings.dim() != 4 or embeddings.shape[1:3] != (1, 1) or embeddings.shape[-1] != config.dim:
        raise VoicePromptError(
            f"{path}: embeddings have shape {list(embeddings.shape)}, expected [frames, 1, 1, {config.dim}] "
            "for this model; was the voice made for another model size?"
        )
    if tuple(cache.shape) != (1, config.num_channels, 4):
        raise VoicePromptError(f"{path}: cache has shape {list(cache.shape)}, expected [1, {config.num_channels}, 4]")
    return SavedVoice(embeddings[:, 0, 0].clone(), cache[0].to(torch.long).clone())


def prompt_frame(config: LMConfig, text: int, agent: tuple[int, ...] | torch.Tensor) -> torch.Tensor:
    """One fully forced prompt frame [channels]: text token, agent codes, user sine."""
    agent = torch.as_tensor(agent, dtype=torch.long)
    return torch.cat([torch.tensor([text]), agent, torch.tensor(SINE_TOKENS)])


def system_prompt_frames(config: LMConfig, voice_codes: torch.Tensor | None, text_tokens: list[int]) -> torch.Tensor:
    """All forced frames of the system prompt, [steps, channels] int64.

    voice_codes: [N, 8] Mimi codes of the voice recording, or None when the voice comes as saved
    embeddings (its frames are then replayed separately, before these). An empty ``text_tokens``
    skips the text phase.
    """
    pad = config.existing_text_padding_id
    frames = []
    if voice_codes is not None:
        frames += [prompt_frame(config, pad, codes) for codes in voice_codes]
    frames += [prompt_frame(config, pad, SILENCE_TOKENS)] * SILENCE_FRAMES
    frames += [prompt_frame(config, token, SILENCE_TOKENS) for token in text_tokens]
    frames += [prompt_frame(config, pad, SILENCE_TOKENS)] * SILENCE_FRAMES
    return torch.stack(frames)


def replay_frame(config: LMConfig) -> torch.Tensor:
    """What the reference pretends was given while replaying a saved voice: PAD and initial audio."""
    return torch.tensor([config.existing_text_padding_id] + [config.audio_initial_token] * config.n_q)


def apply_system_prompt(
    generator, gen_state, lm_state, frames: torch.Tensor, saved_voice: SavedVoice | None = None, *, stepwise: bool = False
) -> None:
    """Force the system prompt into every slot of a batch, which this resets.

    frames: [steps, channels] from ``system_prompt_frames`` (the same for all slots); with a
    ``saved_voice`` its embeddings are replayed first and its token buffer restored. By default the
    frames go through the temporal transformer in one parallel pass (``Generator.prefill``);
    ``stepwise`` feeds them one per step as the reference does (same result, much slower). Every
    channel is forced, so the depth transformer and sampling, whose results would be discarded, are
    skipped either way.
    """
    batch = gen_state.batch_size
    device = gen_state.cache.device
    everyone = torch.ones(batch, dtype=torch.bool, device=device)

    def force(block: torch.Tensor, embeddings: torch.Tensor | None = None) -> None:
        """block: [T, channels]; embeddings: [T, dim] or None."""
        frames_b = block.to(device)[None].expand(batch, -1, -1)
        embeddings_b = None if embeddings is None else embeddings.to(device)[None].expand(batch, -1, -1)
        if not stepwise:
            generator.prefill(gen_state, lm_state, frames_b, embeddings_b)
            return
        for t in range(frames_b.shape[1]):
            generator.step(
                gen_state, lm_state, frames_b[:, t], depth_steps=0,
                input_embeddings=None if embeddings_b is None else embeddings_b[:, t],
            )

    if saved_voice is not None:
        dummy = replay_frame(generator.config)
        generator.reset(gen_state, everyone, dummy.to(device).expand(batch, -1))
        force(dummy.expand(saved_voice.embeddings.shape[0], -1), saved_voice.embeddings)
        gen_state.cache.copy_(saved_voice.cache.to(device).expand_as(gen_state.cache))
        force(frames)
    else:
        generator.reset(gen_state, everyone, frames[0].to(device).expand(batch, -1))
        force(frames[1:])
