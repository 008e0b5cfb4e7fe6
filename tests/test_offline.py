"""``personaplex offline`` end to end on the built-in demo model, and its handling of bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sphn

from personaplex.offline import main as offline_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A demo model cache shared by the tests of this module (built on first use)."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        from personaplex.demo import demo_assets

        demo_assets()
        yield cache


def tone(path: Path, seconds: float, sample_rate: int = 24_000, channels: int = 1) -> Path:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    data = np.stack([wave] * channels).astype(np.float32) if channels > 1 else wave.astype(np.float32)
    if channels > 1:
        # sphn writes mono only; write a stereo PCM wav by hand.
        import wave as wavemod

        with wavemod.open(str(path), "wb") as f:
            f.setnchannels(channels)
            f.setsampwidth(2)
            f.setframerate(sample_rate)
            f.writeframes((data.T * 32767).astype("<i2").tobytes())
    else:
        sphn.write_wav(str(path), data, sample_rate)
    return path


def run_offline(args: list[str], capsys) -> tuple[int, str]:
    code = offline_main(["--model", "demo", "--device", "cpu", *args])
    return code, capsys.readouterr().err


def test_output_has_the_input_duration_and_valid_json(demo_cache, tmp_path, capsys):
    source = tone(tmp_path / "in.wav", 1.3)  # not a whole number of frames
    code, err = run_offline(["--input-wav", str(source), "--output-wav", str(tmp_path / "out.wav"),
                             "--output-text", str(tmp_path / "out.json"), "--seed", "7"], capsys)
    assert code == 0, err
    assert "untrained" in err
    audio, rate = sphn.read(str(tmp_path / "out.wav"))
    assert rate == 24_000 and audio.shape == (1, int(1.3 * 24_000))
    tokens = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert len(tokens) == -(-int(1.3 * 24_000) // 1920) and all(isinstance(t, str) for t in tokens)
    # Beside the token list: the words as text, byte pieces ("<0xC3>" "<0xA9>") joined into characters.
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == joined_pieces(tokens) + "\n"


def joined_pieces(pieces: list[str]) -> str:
    """The token list's words: padding left out, runs of byte pieces decoded as UTF-8."""
    words, pending = [], b""
    for piece in pieces:
        if piece in ("PAD", "EPAD"):
            continue
        if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            pending += bytes([int(piece[3:5], 16)])
            continue
        words.append(pending.decode("utf-8", "replace") + piece)
        pending = b""
    text = "".join(words) + pending.decode("utf-8", "replace")
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text).strip()


def test_seed_reproduces_and_batches_match_single_runs(demo_cache, tmp_path, capsys):
    a, b = tone(tmp_path / "a.wav", 1.0), tone(tmp_path / "b.wav", 0.7)
    single = []
    for name, source in (("a", a), ("b", b)):
        code, err = run_offline(["--input-wav", str(source), "--output-wav", str(tmp_path / f"{name}1.wav"),
                                 "--output-text", str(tmp_path / f"{name}1.json"), "--seed", "3"], capsys)
        assert code == 0, err
        single.append((tmp_path / f"{name}1.json").read_text())
    code, err = run_offline(["--input-wav", str(a), str(b),
                             "--output-wav", str(tmp_path / "a2.wav"), str(tmp_path / "b2.wav"),
                             "--output-text", str(tmp_path / "a2.json"), str(tmp_path / "b2.json"),
                             "--voice-prompt", "NATF2", "NATM1", "--seed", "3"], capsys)
    assert code == 0, err
    assert (tmp_path / "a2.json").read_text() == single[0]  # same persona (NATF2), same seed: same output
    assert len(json.loads((tmp_path / "b2.json").read_text())) == len(json.loads(single[1]))


def test_stereo_and_8khz_inputs_are_converted(demo_cache, tmp_path, capsys):
    stereo = tone(tmp_path / "stereo.wav", 0.5, channels=2)
    narrow = tone(tmp_path / "narrow.wav", 0.5, sample_rate=8_000)
    code, err = run_offline(["--input-wav", str(stereo), str(narrow),
                             "--output-wav", str(tmp_path / "s.wav"), str(tmp_path / "n.wav"),
                             "--output-text", str(tmp_path / "s.json"), str(tmp_path / "n.json")], capsys)
    assert code == 0, err
    assert sphn.read(str(tmp_path / "s.wav"))[0].shape == (1, 12_000)
    assert sphn.read(str(tmp_path / "n.wav"))[0].shape == (1, 12_000)  # 0.5 s at 24 kHz


def bad_input_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk" + os.urandom(200))
    empty = tmp / "empty.wav"
    sphn.write_wav(str(empty), np.zeros(0, dtype=np.float32), 24_000)
    good = tone(tmp / "good.wav", 0.5)
    wrong_weights = tmp / "wrong.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"text_emb.weight": torch.zeros(3, 3)}, str(wrong_weights))
    out = ["--output-wav", str(tmp / "o.wav"), "--output-text", str(tmp / "o.json")]
    return {
        "missing": (["--input-wav", str(tmp / "absent.wav"), *out], "audio file not found"),
        "corrupt": (["--input-wav", str(corrupt), *out], "cannot decode"),
        "empty": (["--input-wav", str(empty), *out], "no audio"),
        "unknown voice": (["--input-wav", str(good), *out, "--voice-prompt", "NOPE9"], "unknown voice 'NOPE9'"),
        "traversal": (["--input-wav", str(good), *out, "--voice-prompt", "../../etc/passwd"], "invalid voice"),
        "too long prompt": (["--input-wav", str(good), *out, "--text-prompt", "word " * 4000], "leaving less than"),
        "outputs mismatch": (["--input-wav", str(good), str(good), *out], "per --input-wav"),
    }


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty", "unknown voice", "traversal", "too long prompt", "outputs mismatch"])
def test_bad_input_gives_one_clear_line(demo_cache, tmp_path, capsys, case):
    args, expected = bad_input_cases(tmp_path)[case]
    code, err = run_offline(args, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def test_wrong_weights_file_is_named(demo_cache, tmp_path, capsys):
    from personaplex.demo import demo_assets

    assets = demo_assets()
    wrong = tmp_path / "wrong.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"text_emb.weight": torch.zeros(3, 3)}, str(wrong))
    code = offline_main(["--device", "cpu", "--input-wav", str(tone(tmp_path / "g.wav", 0.3)), "--output-wav",
                         str(tmp_path / "o.wav"), "--output-text", str(tmp_path / "o.json"),
                         "--moshi-weight", str(wrong), "--mimi-weight", str(assets.mimi_weights),
                         "--tokenizer", str(assets.tokenizer), "--voice-prompt-dir", str(assets.voices_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "no known LM preset fits" in err and "Traceback" not in err


def test_readme_command_on_a_fresh_cache(tmp_path):
    """The README's offline example as a new user runs it: a separate process and an empty cache."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    command = [sys.executable, "-m", "personaplex", "offline", "--model", "demo", "--device", "cpu",
               "--input-wav", str(REPO / "assets/test/input_assistant.wav"),
               "--output-wav", str(tmp_path / "out.wav"), "--output-text", str(tmp_path / "out.json"),
               "--voice-prompt", "NATF2", "--seed", "42424242"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    expected, _ = sphn.read(str(REPO / "assets/test/input_assistant.wav"))
    produced, rate = sphn.read(str(tmp_path / "out.wav"))
    assert rate == 24_000 and produced.shape[-1] == expected.shape[-1]
    assert isinstance(json.loads((tmp_path / "out.json").read_text(encoding="utf-8")), list)


def test_voice_build_then_use_the_voice_file(demo_cache, tmp_path, capsys):
    """Cloning a voice is one command; the file then works as --voice-prompt, with an empty text prompt too."""
    from personaplex.cli import main as cli_main
    from personaplex.demo import demo_assets

    recording = demo_assets().voices_dir / "VARM3.wav"
    code = cli_main(["voice", "build", str(recording), "-o", str(tmp_path / "speaker.safetensors"),
                     "--model", "demo", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "speaker.safetensors" in out.out
    code, err = run_offline(["--input-wav", str(tone(tmp_path / "in.wav", 0.6)), "--output-wav", str(tmp_path / "o.wav"),
                             "--output-text", str(tmp_path / "o.json"), "--voice-prompt",
                             str(tmp_path / "speaker.safetensors"), "--text-prompt", ""], capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "o.json").read_text())) == 8


def test_voice_file_and_its_recording_give_the_same_conversation(demo_cache, tmp_path, capsys):
    """A voice file built from a recording stands for that recording exactly (greedy decoding)."""
    from personaplex.cli import main as cli_main
    from personaplex.demo import demo_assets

    recording = demo_assets().voices_dir / "NATF1.wav"
    assert cli_main(["voice", "build", str(recording), "-o", str(tmp_path / "v.safetensors"), "--model", "demo",
                     "--device", "cpu"]) == 0
    source = tone(tmp_path / "in.wav", 1.5)
    results = []
    for voice in (str(recording), str(tmp_path / "v.safetensors")):
        name = Path(voice).suffix[1:]
        code, err = run_offline(["--input-wav", str(source), "--output-wav", str(tmp_path / f"{name}.wav"),
                                 "--output-text", str(tmp_path / f"{name}.json"), "--voice-prompt", voice, "--greedy"], capsys)
        assert code == 0, err
        results.append((tmp_path / f"{name}.json").read_text())
    assert results[0] == results[1]


def test_folder_of_inputs_with_fewer_slots_than_files(demo_cache, tmp_path, capsys):
    """A folder runs through a small batch (slots are reused as inputs finish); every output equals
    the same input processed alone."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    lengths = {"a": 0.9, "b": 0.4, "c": 1.2, "d": 0.6, "e": 0.3}
    for name, seconds in lengths.items():
        tone(folder / f"{name}.wav", seconds)
    (folder / "notes.txt").write_text("not audio")
    code, err = run_offline(["--input-dir", str(folder), "--output-dir", str(tmp_path / "out"), "--batch-size", "2",
                             "--seed", "9"], capsys)
    assert code == 0, err
    assert "5 input(s), 2 at a time" in err and "x real time" in err
    for name, seconds in lengths.items():
        audio, _ = sphn.read(str(tmp_path / "out" / f"{name}.wav"))
        assert audio.shape[-1] == int(seconds * 24_000)
    code, err = run_offline(["--input-wav", str(folder / "c.wav"), "--output-wav", str(tmp_path / "c.wav"),
                             "--output-text", str(tmp_path / "c.json"), "--seed", "9"], capsys)
    assert code == 0, err
    assert (tmp_path / "c.json").read_text() == (tmp_path / "out" / "c.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["sliding", "pin-persona"])
def test_an_input_longer_than_the_context_is_processed_whole(demo_cache, tmp_path, capsys, monkeypatch,
                                                              short_context_demo, policy):
    """No length cap: an input as long as the model's context (the demo with a 200-frame context, the same code
    as 4 minutes of the 7B), which with its system prompt runs well past the context, comes out whole under
    either ``--context-policy``, which reaches the engine."""
    import personaplex.app.model as model_flags
    from personaplex.engine.engine import Engine

    context = short_context_demo.lm.config.context
    monkeypatch.setattr(model_flags, "load_model_for_args", lambda *args, **kwargs: short_context_demo)
    joined = []
    real_join = Engine.join

    def join(self, first, stop, prompt, sampling, **options):  # the real join, and what it did to the slot
        cached = real_join(self, first, stop, prompt, sampling, **options)
        joined.append((prompt.num_steps, int(self.lm_state.pinned[first])))
        return cached

    monkeypatch.setattr(Engine, "join", join)
    seconds = context * 0.08
    source = tone(tmp_path / "long.wav", seconds)
    code, err = run_offline(["--input-wav", str(source), "--output-wav", str(tmp_path / "out.wav"),
                             "--output-text", str(tmp_path / "out.json"), "--text-prompt", "x", "--seed", "1",
                             "--context-policy", policy], capsys)
    assert code == 0, err
    audio, _ = sphn.read(str(tmp_path / "out.wav"))
    assert audio.shape == (1, int(seconds * 24_000))  # output length equals input length
    tokens = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert len(tokens) == -(-int(seconds * 24_000) // 1920)
    [(prompt_frames, pinned)] = joined
    assert prompt_frames + len(tokens) > 1.25 * context  # positions of the rings: both policies wrapped
    assert pinned == (prompt_frames if policy == "pin-persona" else 0)


def test_an_unknown_context_policy_is_refused(demo_cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        offline_main(["--input-wav", str(tone(tmp_path / "in.wav", 0.3)), "--output-wav", str(tmp_path / "o.wav"),
                      "--output-text", str(tmp_path / "o.json"), "--context-policy", "forever"])
    assert exit_.value.code == 2 and "--context-policy: invalid choice: 'forever'" in capsys.readouterr().err
