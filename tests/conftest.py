"""Shared test fixtures.

Golden fixtures (tensors recorded from the reference implementation) are found through
``PERSONAPLEX_GOLDEN_DIR``, by default ``shared/golden`` beside the repository. Every golden test
reads its configs from that directory, so any fixture set in the same format runs through them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# OpenMP threads that wait for work sleep instead of spinning. On a CPU shared with other work a spinning
# thread holds a core that its sibling needs to finish the same operation: a test that takes 3 s this way
# took 48 s with the default policy under `stress-ng --cpu 2` on 2 cores (bench/NOTES.md, tests under load).
# Read once, when torch loads its OpenMP runtime, so it is set before the import; servers and commands
# that tests start as subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP policy above)

# Without a GPU, Triton kernels (the decode attention) are tested in Triton's interpreter. The switch is
# read when Triton's own functions are defined, so it must be set before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEFAULT_GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"


def golden_dir() -> Path:
    return Path(os.environ.get("PERSONAPLEX_GOLDEN_DIR", DEFAULT_GOLDEN_DIR))


@pytest.fixture(scope="session")
def golden() -> Path:
    """The golden fixture directory; skips the test with the reason when it is absent."""
    path = golden_dir()
    if not (path / "tiny_config.json").is_file():
        pytest.skip(f"golden fixtures not found at {path}; set PERSONAPLEX_GOLDEN_DIR to their directory")
    return path


@pytest.fixture(scope="session")
def golden_config(golden: Path) -> dict:
    return json.loads((golden / "tiny_config.json").read_text())


# The fixture set recorded from the reference (its README's provenance): the one the built-in "tiny" presets
# copy. Other fixture sets in the same format (other sizes) run through every golden test but this comparison.
REFERENCE_FIXTURE = {"commit": "3428dfd95309a7f3c84fd93259ded0f810d1ff91", "lm_seed": 20240601, "mimi_seed": 20240602}


def _is_reference_fixture(config: dict) -> bool:
    return (config.get("reference", {}).get("commit") == REFERENCE_FIXTURE["commit"]
            and config["lm"].get("seed") == REFERENCE_FIXTURE["lm_seed"]
            and config["mimi"].get("seed") == REFERENCE_FIXTURE["mimi_seed"])


@pytest.fixture(scope="session")
def reference_fixture_config() -> dict:
    """``tiny_config.json`` of the reference's own fixture set, from ``PERSONAPLEX_GOLDEN_DIR`` or the default
    directory; skips (with the reason) when neither holds that set."""
    for path in dict.fromkeys([golden_dir(), DEFAULT_GOLDEN_DIR]):
        config_path = path / "tiny_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            if _is_reference_fixture(config):
                return config
    pytest.skip("the reference's fixture set (which the tiny presets copy) is not at PERSONAPLEX_GOLDEN_DIR "
                f"nor at {DEFAULT_GOLDEN_DIR}")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The fixtures were recorded with 2 threads; results are identical with 1, so pin it for speed
    # and reproducibility on small CI machines. (One thread does twice the work under other CPU load, half
    # on a quiet 2-core machine: bench/NOTES.md, tests under load.)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def run_golden_through_engine(golden):
    """A function (engine, lm, mimi, voice file) -> (tokens, pcm): the golden persona joined in slot 1 of a
    two-slot engine (greedy), then the golden user audio streamed frame by frame; rows on the host."""
    from safetensors.torch import load_file

    from personaplex.audio import read_audio, split_frames
    from personaplex.config import LMConfig
    from personaplex.engine import SamplingConfig
    from personaplex.persona import build_system_prompt, load_voice

    def run(engine, lm, mimi, voice_file: str) -> tuple[torch.Tensor, torch.Tensor]:
        session = load_file(golden / "golden_lm_session.safetensors")
        voice = load_voice(golden / voice_file, lm.config, mimi)
        prompt = build_system_prompt(
            LMConfig(**{**lm.config.__dict__, "context": 3000}), voice, session["text_prompt_tokens"].tolist()
        )  # the tiny 24-frame context is too short for the prompt-length guard; the math is unchanged
        engine.join(1, 2, prompt, SamplingConfig(greedy=True))
        tokens, pcm = [], []
        for frame in split_frames(read_audio(golden / "user_input.wav")):
            batch = torch.zeros(2, frame.shape[0])
            batch[1] = torch.from_numpy(frame)
            out = engine.step(batch)
            tokens.append(out.tokens[1])
            pcm.append(out.pcm[1])
        return torch.stack(tokens), torch.stack(pcm).float().cpu()

    return run


def require_triton_kernels() -> None:
    """Skip (with the reason) where the Triton kernels cannot run: no Triton, or no GPU and a Triton whose
    interpreter predates numpy 2 support (3.8)."""
    triton = pytest.importorskip("triton", reason="the decode attention kernels need Triton")
    if not torch.cuda.is_available():
        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
        if version < (3, 8):
            pytest.skip(f"Triton {triton.__version__}'s CPU interpreter fails with numpy 2: pip install 'triton>=3.8'")


@pytest.fixture(scope="module")
def demo_model():
    """The built-in demo model on the CPU, loaded once per test module (its servers' hubs are the module's own)."""
    from personaplex.demo import demo_assets
    from personaplex.loading import load_model

    return load_model(demo_assets(), "cpu")


SHORT_CONTEXT_FRAMES = 200  # 16 s: room for a short persona's prompt and 10 s of talk, then the rings wrap


@pytest.fixture(scope="session")
def short_context_demo():
    """The demo model with a 200-frame context instead of 3000, so that calls run past it in seconds.

    Only the KV ring capacity changes (the weights do not depend on it): what happens at the context's
    end is the same code as at 4 minutes with the real model."""
    import dataclasses

    from personaplex.config import get_preset
    from personaplex.demo import DEMO_PRESET, demo_assets
    from personaplex.loading import load_lm, load_mimi
    from personaplex.loading import LoadedModel
    from personaplex.text import TextTokenizer

    assets = demo_assets()
    preset = get_preset(DEMO_PRESET)
    lm = load_lm(assets.lm_weights, dataclasses.replace(preset.lm, context=SHORT_CONTEXT_FRAMES), dtype=torch.float32)
    mimi = load_mimi(assets.mimi_weights, preset.mimi)
    return LoadedModel(DEMO_PRESET, lm, mimi, TextTokenizer(assets.tokenizer), assets.voices_dir, assets.untrained)
