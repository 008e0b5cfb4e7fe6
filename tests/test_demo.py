"""The built-in demo model: deterministic, loadable with the real loaders, tokenizer and voices usable."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from personaplex.audio import normalize_loudness, read_audio
from personaplex.checkpoint import detect_lm_preset
from personaplex.config import SAMPLE_RATE, get_preset
from personaplex.demo import DEMO_PRESET, DEMO_VERSION, VOICE_NAMES, default_cache_dir, demo_assets, demo_corpus
from personaplex.loading import load_lm, load_mimi
from personaplex.model_assets import AssetError
from personaplex.persona import available_voices, load_voice, resolve_voice
from personaplex.text import EPAD, PAD, SYSTEM_TAG, TextTokenizer, wrap_system_tags

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET = get_preset(DEMO_PRESET)


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return demo_assets(tmp_path_factory.mktemp("demo"))


def test_assets_describe_an_untrained_demo(assets):
    assert assets.preset == DEMO_PRESET and assets.untrained
    assert assets.lm_weights.parent == assets.tokenizer.parent == assets.voices_dir.parent
    assert "untrained" in PRESET.description


def test_two_builds_are_byte_identical_and_a_rebuild_writes_nothing(assets, tmp_path):
    first = digests(assets.lm_weights.parent)
    said = []
    assert digests(demo_assets(tmp_path, say=said.append).lm_weights.parent) == first
    # A first build says what it builds (it takes seconds) and how long it took.
    assert said[0].startswith(f"building the demo model (untrained, no download) into {tmp_path}")
    assert [line.strip() for line in said[1:-1]] == [
        "the text tokenizer (SentencePiece)...", "the Mimi codec's random weights...", "the LM's random weights...",
        "18 voices...",
    ]
    assert re.fullmatch(r"demo model ready in \d+\.\d s", said[-1])
    stamps = {p: p.stat().st_mtime_ns for p in assets.lm_weights.parent.rglob("*") if p.is_file()}
    said.clear()
    demo_assets(assets.lm_weights.parent, say=said.append)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert said == []  # nothing built, nothing said
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary files left behind


@pytest.mark.slow
def test_concurrent_builds_do_not_corrupt(assets, tmp_path):
    script = "import sys; from personaplex.demo import demo_assets; demo_assets(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    builds = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env) for _ in range(2)]
    assert [b.wait(timeout=300) for b in builds] == [0, 0]
    assert digests(tmp_path) == digests(assets.lm_weights.parent)


def test_a_folder_holding_an_older_build_gets_this_one(assets, tmp_path):
    """Weights of another demo version (other shapes) are rebuilt, never loaded with the wrong shape."""
    from safetensors.torch import save_file

    built = assets.lm_weights.parent
    folder = tmp_path / "old"
    folder.mkdir()
    for path in built.rglob("*"):
        if path.is_file():
            (folder / path.relative_to(built)).parent.mkdir(parents=True, exist_ok=True)
            (folder / path.relative_to(built)).write_bytes(path.read_bytes())
    old_gating = "depformer.layers.0.gating.0.linear_in.weight"
    save_file({old_gating: torch.zeros(2 * 341, 128, dtype=torch.bfloat16)}, str(folder / "lm.safetensors"),
              metadata={"description": "personaplex demo model v1: untrained random weights"})
    (folder / "mimi.safetensors").write_bytes(b"truncated")
    demo_assets(folder)
    assert digests(folder) == digests(built)
    assert load_lm(folder / "lm.safetensors", PRESET.lm, dtype=torch.float32) is not None


def test_the_depformer_gating_width_is_the_references(assets):
    """The demo's depformer (dim 128, feed-forward 4 * 128) takes the reference's 21 * dim // 8 = 336."""
    from safetensors import safe_open

    assert PRESET.lm.depformer_ffn_hidden == 336
    with safe_open(str(assets.lm_weights), framework="pt") as f:
        assert f.get_slice("depformer.layers.0.gating.0.linear_in.weight").get_shape() == [672, 128]
        assert f.get_slice("depformer.layers.0.gating.0.linear_out.weight").get_shape() == [128, 336]


def test_default_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "personaplex" / f"demo-v{DEMO_VERSION}"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "personaplex" / f"demo-v{DEMO_VERSION}"


def test_tokenizer_fits_the_preset_and_round_trips(assets):
    tokenizer = TextTokenizer(assets.tokenizer)
    assert tokenizer.vocab_size == PRESET.lm.text_card
    processor = tokenizer.processor
    # The real tokenizer's conventions: 0 unk (EPAD on the text stream), 1 BOS, 2 EOS, 3 pad (PAD).
    assert [processor.IdToPiece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    prompt = "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way."
    ids = tokenizer.encode_prompt(prompt)
    assert processor.DecodeIds(ids) == wrap_system_tags(prompt)
    assert "".join(tokenizer.piece(i) for i in ids).strip().startswith(SYSTEM_TAG)


@pytest.mark.parametrize(
    "text", ["Hello, how can I help you today?", "Naïve café, 42 €, 東京, emoji 🙂", "<system>"]
)
def test_text_never_maps_to_padding_ids(assets, text):
    ids = TextTokenizer(assets.tokenizer).encode_prompt(text)
    assert ids and EPAD not in ids and PAD not in ids and all(0 <= i < PRESET.lm.text_card for i in ids)


def test_corpus_tokenizes_without_special_ids(assets):
    processor = TextTokenizer(assets.tokenizer).processor
    for sentence in demo_corpus():
        assert not {0, 1, 2, 3} & set(processor.EncodeAsIds(sentence)), sentence


def test_weights_load_strictly_with_the_real_loaders(assets):
    lm = load_lm(assets.lm_weights, PRESET.lm, dtype=torch.float32, preset_name=DEMO_PRESET)
    mimi = load_mimi(assets.mimi_weights, PRESET.mimi, preset_name=DEMO_PRESET)
    assert lm.text_emb.weight.shape == (PRESET.lm.text_card + 1, PRESET.lm.dim)
    assert all(torch.isfinite(p).all() for p in lm.parameters())
    assert all(torch.isfinite(p).all() for p in mimi.parameters())
    assert detect_lm_preset(assets.lm_weights) == DEMO_PRESET


def test_voices_have_the_preset_names_and_decode(assets):
    assert available_voices(assets.voices_dir) == sorted(VOICE_NAMES)
    assert len(VOICE_NAMES) == 18
    pitches = {}
    for name in VOICE_NAMES:
        path = resolve_voice(name, assets.voices_dir, allow_paths=False)
        samples = read_audio(path)
        assert 2 * SAMPLE_RATE <= samples.shape[0] <= 4 * SAMPLE_RATE
        normalized = normalize_loudness(samples)
        assert np.isfinite(normalized).all() and np.abs(normalized).max() < 1.0
        pitches[name] = dominant_pitch(samples)
    female = [p for n, p in pitches.items() if n[3] == "F"]
    male = [p for n, p in pitches.items() if n[3] == "M"]
    assert min(female) > max(male)  # the F/M names sound like it
    assert len(set(np.round(list(pitches.values())))) > 10  # and the voices differ


def dominant_pitch(samples: np.ndarray) -> float:
    """Median fundamental (Hz) of the loud 40 ms frames, from each frame's autocorrelation peak."""
    frame = int(0.04 * SAMPLE_RATE)
    shortest, longest = SAMPLE_RATE // 400, SAMPLE_RATE // 60
    chunks = samples[: samples.shape[0] // frame * frame].reshape(-1, frame)
    loud = chunks[np.abs(chunks).max(axis=1) > 0.5 * np.abs(samples).max()]
    pitches = []
    for chunk in loud:
        correlation = np.correlate(chunk, chunk, mode="full")[frame - 1:]
        pitches.append(SAMPLE_RATE / (shortest + np.argmax(correlation[shortest:longest])))
    return float(np.median(pitches))


def test_a_demo_voice_goes_through_the_demo_mimi(assets):
    mimi = load_mimi(assets.mimi_weights, PRESET.mimi)
    with torch.no_grad():
        voice = load_voice(assets.voices_dir / "NATF2.wav", PRESET.lm, mimi)
    assert voice.codes.shape == (38, 8)  # 3 s at 12.5 Hz, last frame padded
    assert 0 <= voice.codes.min() and voice.codes.max() < PRESET.lm.card


def test_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AssetError, match="cannot write the demo model to .*XDG_CACHE_HOME"):
        demo_assets(blocker / "demo")
