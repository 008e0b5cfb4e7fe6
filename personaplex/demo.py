"""The built-in demo model: every command can be tried on a fresh machine, with no download and no GPU.

``demo_assets()`` builds, once, into ``~/.cache/personaplex/demo-v<N>`` (N = ``DEMO_VERSION``,
``$XDG_CACHE_HOME`` honoured):

- ``lm.safetensors``, ``mimi.safetensors``: random weights of the ``demo`` preset in the published key
  layout, drawn on the CPU from fixed seeds, so every machine gets the same bytes;
- ``tokenizer.model``: a real SentencePiece model trained on a small English corpus shipped with the
  package, with the id conventions of the real tokenizer (0 unk = EPAD, 1 BOS, 2 EOS, 3 PAD);
- ``voices/<NAME>.wav``: procedural vowel-like "voices" under the names of the real presets.

The model is untrained: it runs every code path at full speed, but what it says is noise. Every file
is written to a temporary name and renamed into place, so an interrupted or concurrent build never
leaves a partial file; the contents are deterministic, so whichever concurrent build wins, the bytes
are the same. Changing anything that alters the bytes must bump ``DEMO_VERSION``: the default folder changes
with it, and weights of another version found in a folder given by hand are rebuilt (never loaded).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import wave
import zlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from .config import SAMPLE_RATE, get_preset
from .model_assets import AssetError, ModelAssets

DEMO_PRESET = "demo"
# 2: the depformer's gated feed-forward width follows the reference's 21 * dim // 8 rule (336, was 341).
DEMO_VERSION = 2
LM_SEED = 1_000
MIMI_SEED = 2_000
LM_FILE = "lm.safetensors"
MIMI_FILE = "mimi.safetensors"
TOKENIZER_FILE = "tokenizer.model"
VOICES_FOLDER = "voices"
CORPUS_RESOURCE = "demo_corpus.txt"

# The names of the published presets: natural (NAT) and varied (VAR) voices, F/M.
VOICE_NAMES: tuple[str, ...] = (
    *(f"NATF{i}" for i in range(4)), *(f"NATM{i}" for i in range(4)),
    *(f"VARF{i}" for i in range(5)), *(f"VARM{i}" for i in range(5)),
)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/personaplex/demo-v<N>``, by default under ``~/.cache``."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "personaplex" / f"demo-v{DEMO_VERSION}"


def demo_assets(cache_dir: str | Path | None = None, *, say: Callable[[str], None] | None = None) -> ModelAssets:
    """Paths of the demo model's files, building the missing ones first (seconds on a CPU). While building,
    ``say`` (default: a line on stderr) is told what is being built and, at the end, how long it took."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    voices = folder / VOICES_FOLDER
    preset = get_preset(DEMO_PRESET)
    say = say or _say_on_stderr
    parts = [
        ("the text tokenizer (SentencePiece)", folder / TOKENIZER_FILE, lambda: train_tokenizer(preset.lm.text_card),
         None),
        ("the Mimi codec's random weights", folder / MIMI_FILE, lambda: _mimi_bytes(preset.mimi), _is_this_version),
        ("the LM's random weights", folder / LM_FILE, lambda: _lm_bytes(preset.lm), _is_this_version),
        *((f"{len(VOICE_NAMES)} voices", voices / f"{name}.wav", lambda name=name: wav_bytes(synthesize_voice(name)),
           None) for name in VOICE_NAMES),
    ]
    missing = [part for part in parts if not _is_built(part[1], part[3])]
    started = time.perf_counter()
    if missing:
        say(f"building the demo model (untrained, no download) into {folder}; this happens once")
    try:
        voices.mkdir(parents=True, exist_ok=True)
        announced = set()
        for what, path, make, is_current in missing:
            if what not in announced:
                say(f"  {what}...")
                announced.add(what)
            _build_once(path, make, is_current)
    except OSError as exc:
        raise AssetError(
            f"cannot write the demo model to {folder} ({exc}); free some space (about 70 MB) or set XDG_CACHE_HOME "
            "to a writable folder"
        ) from exc
    if missing:
        say(f"demo model ready in {time.perf_counter() - started:.1f} s")
    return ModelAssets(folder / LM_FILE, folder / MIMI_FILE, folder / TOKENIZER_FILE, voices, preset=DEMO_PRESET,
                       untrained=True)


def _say_on_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _is_built(path: Path, is_current: Callable[[Path], bool] | None) -> bool:
    return path.is_file() and (is_current is None or is_current(path))


def _build_once(path: Path, make: Callable[[], bytes], is_current: Callable[[Path], bool] | None = None) -> Path:
    """Write ``make()`` (bytes) to ``path`` unless it exists (and ``is_current`` accepts it): temp file in the same
    folder, then rename."""
    if _is_built(path, is_current):
        return path
    data = make()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes files private; these are plain cache files
        os.replace(temporary, path)  # atomic; a concurrent build writes identical bytes
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# --- weights -------------------------------------------------------------------------------------

# One key only: safetensors writes metadata in hash-map order, so several keys would make the bytes
# differ from run to run.
_METADATA = {"description": f"personaplex demo model v{DEMO_VERSION}: untrained random weights"}


def _is_this_version(path: Path) -> bool:
    """Whether a weights file was built by this ``DEMO_VERSION`` (its header's description says so).

    The default folder is per version already; this catches a folder given by hand that holds an older build,
    whose tensors may have other shapes: it is rebuilt rather than loaded.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("description") == _METADATA["description"]
    except Exception:  # unreadable or truncated: rebuild it
        return False


def _lm_bytes(config) -> bytes:
    import torch
    from safetensors.torch import save

    from .lm.model import LMModel
    from .random_weights import randomize_

    with torch.device("cpu"):
        model = LMModel(config)
    randomize_(model, LM_SEED)
    # bfloat16 like the published LM checkpoint.
    tensors = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    return save(tensors, metadata=_METADATA)


def _mimi_bytes(config) -> bytes:
    from safetensors.torch import save

    from .random_weights import random_mimi_state_dict

    tensors = {name: t.contiguous() for name, t in random_mimi_state_dict(config, MIMI_SEED).items()}
    return save(tensors, metadata=_METADATA)


# --- tokenizer -----------------------------------------------------------------------------------


def demo_corpus() -> list[str]:
    """The training sentences shipped with the package, in file order."""
    text = resources.files("personaplex.assets_data").joinpath(CORPUS_RESOURCE).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_tokenizer(vocab_size: int) -> bytes:
    """A serialized SentencePiece BPE model of exactly ``vocab_size`` pieces, trained deterministically.

    Ids 0..3 are the special pieces of the real tokenizer (unk, BOS, EOS, pad), so text never maps
    to EPAD (0) or PAD (3); byte fallback keeps even characters outside the corpus off ``unk``.
    """
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        # Determinism: one thread, corpus order, no sampling of sentences.
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return model.getvalue()


# --- voices --------------------------------------------------------------------------------------

VOICE_SECONDS = 3.0
# Formants (Hz) of five vowels (a, e, i, o, u) of an adult male voice; female voices scale them up.
VOWEL_FORMANTS = np.array([(730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240)])
FORMANT_WIDTHS = np.array([90.0, 110.0, 170.0])


def synthesize_voice(name: str, sample_rate: int = SAMPLE_RATE, seconds: float = VOICE_SECONDS) -> np.ndarray:
    """A deterministic vowel-like "speech" clip for a preset name: float32 samples [T] in [-1, 1].

    A harmonic source around 110 Hz (M) or 210 Hz (F), each name with its own pitch, speaking rate
    and breathiness, shaped by vowel formants that change every syllable, with syllable envelopes
    and short pauses. Peak 0.5, so loudness normalisation to -24 LUFS works as on a recording.
    """
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # stable across runs, unlike hash()
    female = name[3] == "F"
    varied = name.startswith("VAR")
    base_pitch = (210.0 if female else 110.0) * rng.uniform(0.85, 1.15)
    formant_scale = 1.17 if female else 1.0
    syllable_rate = rng.uniform(3.5, 5.5) if varied else rng.uniform(4.0, 4.8)  # syllables per second
    pitch_swing = rng.uniform(0.12, 0.25) if varied else rng.uniform(0.05, 0.12)
    breath = rng.uniform(0.02, 0.08)

    count = int(seconds * sample_rate)
    t = np.arange(count) / sample_rate
    # Syllables: a sequence of (start, length, vowel); a pause now and then, as between words.
    envelope = np.zeros(count)
    vowel_of_sample = np.zeros(count, dtype=np.int64)
    start = 0.15
    while start < seconds - 0.2:
        length = rng.uniform(0.6, 1.0) / syllable_rate
        first, last = int(start * sample_rate), min(count, int((start + length) * sample_rate))
        phase = np.linspace(0.0, np.pi, last - first)
        envelope[first:last] = np.sin(phase) ** 0.6 * rng.uniform(0.6, 1.0)
        vowel_of_sample[first:last] = rng.integers(len(VOWEL_FORMANTS))
        start += length + (rng.uniform(0.2, 0.4) if rng.random() < 0.2 else rng.uniform(0.02, 0.06))

    # Pitch: falls slowly over the phrase (declination) with a slow wobble and per-name inflection.
    wobble = np.sin(2 * np.pi * rng.uniform(0.7, 1.6) * t + rng.uniform(0, 2 * np.pi))
    pitch = base_pitch * (1.0 + pitch_swing * wobble - 0.1 * t / seconds)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate

    source = np.zeros(count)
    harmonics = int(5000 / (base_pitch * (1 - pitch_swing - 0.1)))
    formants = VOWEL_FORMANTS[vowel_of_sample] * formant_scale  # [T, 3]
    for k in range(1, harmonics + 1):
        frequency = k * pitch  # [T]
        # Vowel colour: resonances at the formants over a -6 dB/octave glottal tilt.
        resonance = np.exp(-0.5 * ((frequency[:, None] - formants) / FORMANT_WIDTHS) ** 2) @ np.array([1.0, 0.6, 0.3])
        source += (0.15 + resonance) / k * np.sin(k * phase)
    noise = rng.standard_normal(count)
    noise = np.convolve(noise, np.ones(4) / 4, mode="same")  # soften the hiss a little
    signal = envelope * (source + breath * np.abs(source).max() * noise)
    return (0.5 * signal / np.abs(signal).max()).astype(np.float32)


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit mono PCM WAV of float samples [T] in [-1, 1]."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())
    return buffer.getvalue()
