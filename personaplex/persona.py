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
from .lm.token_buffer import cache_columns

SAVED_VOICE_SUFFIXES = (".pt", ".safetensors")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")
MIN_CONVERSATION_FRAMES = int(10 * FRAME_RATE)  # context a prompt must leave free for talking

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
    cache: [channels, max_delay + 3] the generator token buffer after the voice phase.
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
    expected = [1, config.num_channels, cache_columns(config.max_delay)]
    if list(cache.shape) != expected:
        raise VoicePromptError(f"{path}: cache has shape {list(cache.shape)}, expected {expected}")
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
    for _ in system_prompt_work(generator, gen_state, lm_state, frames, saved_voice, stepwise=stepwise):
        pass


def system_prompt_work(
    generator, gen_state, lm_state, frames: torch.Tensor, saved_voice: SavedVoice | None = None, *,
    chunk_frames: int | None = None, stepwise: bool = False, temporal=None,
):
    """``apply_system_prompt`` as a generator that pauses after every block of at most ``chunk_frames``
    frames, yielding the number of frames just processed. Between two blocks the state is consistent,
    so an engine can interleave a long prompt with the real-time steps of other slots. ``temporal``: see
    ``Generator.prefill``."""
    batch = gen_state.batch_size
    device = gen_state.cache.device
    # The token state is kept on the host as well, so that no block reads it back from the device.
    host = generator.new_state(batch, "cpu")

    def force(block: torch.Tensor, embeddings: torch.Tensor | None = None):
        """block: [T, channels]; embeddings: [T, dim] or None. Yields after each chunk."""
        size = chunk_frames or max(1, block.shape[0])
        for first in range(0, block.shape[0], size):
            part = block[first : first + size][None].expand(batch, -1, -1)
            part_embeddings = None
            if embeddings is not None:
                part_embeddings = embeddings[first : first + size].to(device)[None].expand(batch, -1, -1)
            if stepwise:
                part = part.to(device)
                for t in range(part.shape[1]):
                    generator.step(
                        gen_state, lm_state, part[:, t], depth_steps=0,
                        input_embeddings=None if part_embeddings is None else part_embeddings[:, t],
                    )
            else:
                generator.prefill(gen_state, lm_state, part, part_embeddings, host_state=host, temporal=temporal)
            yield part.shape[1]

    def start(first_frame: torch.Tensor) -> None:
        generator.reset(host, torch.ones(batch, dtype=torch.bool), first_frame.expand(batch, -1))
        for tensor, value in zip(gen_state.tensors(), host.tensors()):
            tensor.copy_(value, non_blocking=True)

    if saved_voice is not None:
        dummy = replay_frame(generator.config)
        start(dummy)
        yield from force(dummy.expand(saved_voice.embeddings.shape[0], -1), saved_voice.embeddings)
        host.cache.copy_(saved_voice.cache.expand_as(host.cache))
        gen_state.cache.copy_(host.cache, non_blocking=True)
        yield from force(frames)
    else:
        start(frames[0])
        yield from force(frames[1:])


def _is_bare_name(name: str) -> bool:
    return bool(name) and not any(c in name for c in "/\\\0") and name not in (".", "..") and not name.startswith(".")


def available_voices(voices_dir: Path | None) -> list[str]:
    """Preset names (file stems) found in ``voices_dir``, sorted."""
    if voices_dir is None or not Path(voices_dir).is_dir():
        return []
    suffixes = SAVED_VOICE_SUFFIXES + AUDIO_SUFFIXES
    return sorted({p.stem for p in Path(voices_dir).iterdir() if p.is_file() and p.suffix.lower() in suffixes})


def resolve_voice(voice: str | Path, voices_dir: Path | None, *, allow_paths: bool = True) -> Path:
    """The file a voice request names.

    ``voice`` is a preset name (``NATF2`` or ``NATF2.pt``) looked up inside ``voices_dir`` or, when
    ``allow_paths`` (the command line, not network clients), a path to a voice or audio file. A preset
    name can never leave ``voices_dir``: separators, ``..`` and hidden names are refused.
    """
    text = str(voice).strip()
    suffixes = SAVED_VOICE_SUFFIXES + AUDIO_SUFFIXES
    if allow_paths and (Path(text).is_file() or "/" in text or "\\" in text):
        path = Path(text).expanduser()
        if path.suffix.lower() not in suffixes:
            raise VoicePromptError(
                f"invalid voice {text!r}: give a preset name (e.g. NATF2) or a voice/audio file ({', '.join(suffixes)})"
            )
        if not path.is_file():
            raise VoicePromptError(f"voice file not found: {path}")
        return path
    if not _is_bare_name(text):
        raise VoicePromptError(f"invalid voice name {text!r}: give a preset name such as NATF2")
    if voices_dir is None:
        raise VoicePromptError(f"voice {text!r} is not a file and no voices directory is set (--voice-prompt-dir)")
    root = Path(voices_dir).resolve()
    candidates = [text] if Path(text).suffix.lower() in suffixes else []
    candidates += [text + suffix for suffix in suffixes]
    for name in candidates:
        path = (root / name).resolve()
        if path.parent == root and path.is_file():
            return path
    known = ", ".join(available_voices(root)) or "none"
    where = f" in {root}" if allow_paths else ""  # network clients never learn the server's folders
    raise VoicePromptError(f"unknown voice {text[:60]!r}; available{where}: {known}")


@dataclass
class VoicePrompt:
    """A voice as the LM takes it: Mimi codes of a recording, or saved embeddings."""

    source: str
    codes: torch.Tensor | None = None  # [N, 8] int64
    saved: SavedVoice | None = None

    @property
    def num_frames(self) -> int:
        return self.saved.num_frames if self.saved is not None else self.codes.shape[0]


def voice_frames_from_audio(path: str | Path, limits=None):
    """The reference's audio pipeline: decode, mono 24 kHz, -24 LUFS, 1920-sample frames [N, 1920] float32.
    ``limits``: an ``audio.AudioLimits`` for audio from an untrusted source (bounded while decoding)."""
    from .audio import normalize_loudness, read_audio, split_frames

    return split_frames(normalize_loudness(read_audio(path, limits=limits)))


ENCODE_CHUNK_FRAMES = 25  # 2 s of voice per Mimi call: a build can be abandoned between two chunks


class BuildCancelled(PersonaplexError):
    """A voice build was abandoned (its caller left, or the server is shutting down)."""


def load_voice(path: str | Path, lm_config: LMConfig, mimi, *, limits=None, cancelled=None) -> VoicePrompt:
    """Load a voice file: saved embeddings (``.pt``/``.safetensors``) or any audio file (Mimi-encoded).

    ``limits``: an ``audio.AudioLimits`` when the file comes from an untrusted source. ``cancelled``: a
    callable checked between encoding chunks; when it returns True the build stops with ``BuildCancelled``.
    """
    path = Path(path)
    if path.suffix.lower() in SAVED_VOICE_SUFFIXES:
        return VoicePrompt(source=str(path), saved=load_saved_voice(path, lm_config))
    frames = torch.from_numpy(voice_frames_from_audio(path, limits))
    device = next(mimi.parameters()).device
    state = mimi.new_encoder_state(1, device)
    parts = []
    for first in range(0, frames.shape[0], ENCODE_CHUNK_FRAMES):  # streaming: chunked codes equal whole-clip codes
        if cancelled is not None and cancelled():
            raise BuildCancelled("the voice build was abandoned")
        parts.append(encode_audio_frames(mimi, frames[first : first + ENCODE_CHUNK_FRAMES].to(device), state))
    return VoicePrompt(source=str(path), codes=torch.cat(parts).cpu())


def encode_audio_frames(mimi, frames: torch.Tensor, state) -> torch.Tensor:
    """Mimi codes [N, 8] of frames [N, 1920] for one slot, continuing ``state``."""
    if hasattr(mimi, "encode_clip"):
        return mimi.encode_clip(frames.reshape(1, -1), state)[0]
    return torch.stack([mimi.encode_frame(frame[None], state)[0] for frame in frames])


@dataclass
class SystemPrompt:
    """Everything forced into a slot before the conversation: see the module docstring."""

    frames: torch.Tensor  # [steps, channels]
    saved_voice: SavedVoice | None

    def fingerprint(self) -> str:
        """A digest of everything the prompt forces: equal prompts leave equal states."""
        import hashlib

        digest = hashlib.sha256(self.frames.cpu().numpy().tobytes())
        if self.saved_voice is not None:
            digest.update(self.saved_voice.embeddings.float().cpu().numpy().tobytes())
            digest.update(self.saved_voice.cache.cpu().numpy().tobytes())
        return digest.hexdigest()

    @property
    def num_steps(self) -> int:
        """LM steps the prompt occupies (counting the model-less first step)."""
        replayed = self.saved_voice.num_frames if self.saved_voice is not None else 0
        return replayed + self.frames.shape[0]


class PromptTooLongError(PersonaplexError):
    """The system prompt would not leave room for a conversation in the model's context."""


def build_system_prompt(lm_config: LMConfig, voice: VoicePrompt | None, text_tokens: list[int]) -> SystemPrompt:
    """The forced frames for a voice and a tokenized text prompt; checks that they fit the context."""
    codes = voice.codes if voice is not None else None
    prompt = SystemPrompt(system_prompt_frames(lm_config, codes, text_tokens), voice.saved if voice is not None else None)
    room = lm_config.context - 1 - prompt.num_steps
    if room < MIN_CONVERSATION_FRAMES:
        voice_frames = voice.num_frames if voice is not None else 0
        raise PromptTooLongError(
            f"the system prompt takes {prompt.num_steps} frames (voice {voice_frames}, text {len(text_tokens)} tokens, "
            f"silences {2 * SILENCE_FRAMES}) of the model's {lm_config.context - 1}-frame context, leaving less than "
            f"{MIN_CONVERSATION_FRAMES / FRAME_RATE:.0f} s to talk; shorten the text prompt or the voice recording"
        )
    return prompt


def record_voice(generator, lm_state_factory, codes: torch.Tensor) -> SavedVoice:
    """Run the voice phase of the prompt for Mimi ``codes`` [N, 8] and keep what the reference saves:
    the input embeddings of steps 1..N-1 and the token buffer after the last voice step."""
    config = generator.config
    device = generator.model.device
    frames = torch.stack([prompt_frame(config, config.existing_text_padding_id, c) for c in codes.cpu()]).to(device)
    gen_state, lm_state = generator.new_state(1), lm_state_factory(1)
    generator.reset(gen_state, torch.ones(1, dtype=torch.bool, device=device), frames[:1])
    embeddings = generator.prefill(gen_state, lm_state, frames[None, 1:])
    return SavedVoice(embeddings[0].float().cpu(), gen_state.cache[0].cpu().clone())


def save_voice_file(voice: SavedVoice, path: str | Path, *, model_name: str, source: str) -> Path:
    """Write a voice as safetensors in the reference tensor layout (embeddings [N-1, 1, 1, dim], cache
    [1, channels, max_delay + 3]) with metadata naming the model it was made for."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"embeddings": voice.embeddings[:, None, None].contiguous(), "cache": voice.cache[None].contiguous()}
    save_file(tensors, str(path), metadata={"format": "personaplex-voice", "model": model_name, "source": source})
    return path
