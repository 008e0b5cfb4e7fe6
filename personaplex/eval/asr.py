"""Speech recognisers with word timestamps, producing the benchmark's transcript format.

``{"text": "...", "chunks": [{"text": word, "timestamp": [start, end]}, ...]}``, times in seconds from the start
of the file. ``pocketsphinx`` (default) ships an English model and needs no download; ``parakeet`` (NVIDIA NeMo,
the recogniser the benchmark itself uses) and ``whisper`` (faster-whisper) need their package installed and
their weights on local disk (``--asr-model PATH``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import numpy as np

from .vad import MissingDependency

ASR_RATE = 16_000
BACKENDS = ("pocketsphinx", "parakeet", "whisper")


class Recognizer(Protocol):
    name: str

    def words(self, samples: np.ndarray) -> list[tuple[str, float, float]]:
        """(word, start s, end s) for 16 kHz mono float32 audio."""
        ...


def transcript(words: list[tuple[str, float, float]]) -> dict:
    """The benchmark's output.json content."""
    return {"text": " ".join(w for w, _, _ in words),
            "chunks": [{"text": w, "timestamp": [round(s, 3), round(e, 3)]} for w, s, e in words]}


def transcribe_file(recognizer: Recognizer, path: Path) -> dict:
    from ..audio import read_audio  # scipy and pyloudnorm: only once a file is read, not for --help

    samples = read_audio(path, ASR_RATE)
    if not np.any(np.abs(samples) > 1e-4):  # silence: recognisers may hallucinate on digital zero
        return transcript([])
    return transcript(recognizer.words(samples))


class PocketsphinxRecognizer:
    """CMU PocketSphinx with its bundled US English acoustic model, dictionary and language model."""

    name = "pocketsphinx"
    _FILLER = re.compile(r"^(<.*>|\[.*\]|\+\+.*\+\+)$")

    def __init__(self):
        try:
            from pocketsphinx import Decoder
        except ImportError as error:
            raise MissingDependency("the default recogniser needs pocketsphinx: pip install 'personaplex[eval]'") from error
        self._decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")
        self._frame_rate = int(self._decoder.config["frate"])

    def words(self, samples: np.ndarray) -> list[tuple[str, float, float]]:
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        decoder = self._decoder
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        found = []
        for segment in decoder.seg():
            if self._FILLER.match(segment.word):
                continue
            word = re.sub(r"\(\d+\)$", "", segment.word)  # alternate pronunciations: "the(2)"
            found.append((word, segment.start_frame / self._frame_rate, (segment.end_frame + 1) / self._frame_rate))
        return found


class ParakeetRecognizer:
    """NVIDIA Parakeet TDT (NeMo) from a local ``.nemo`` file, with word timestamps."""

    name = "parakeet"

    def __init__(self, model: Path | None):
        try:
            import nemo.collections.asr as nemo_asr
        except ImportError as error:
            raise MissingDependency("the parakeet recogniser needs NVIDIA NeMo: pip install 'nemo_toolkit[asr]'") from error
        if model is None or not Path(model).is_file():
            raise MissingDependency(f"parakeet weights not found: give --asr-model PATH to a local .nemo file "
                                    f"(e.g. parakeet-tdt-0.6b-v2.nemo){'' if model is None else f', not {model}'}")
        self._model = nemo_asr.models.ASRModel.restore_from(str(model))

    def words(self, samples: np.ndarray) -> list[tuple[str, float, float]]:
        result = self._model.transcribe([samples], timestamps=True)[0]
        return [(w["word"], float(w["start"]), float(w["end"])) for w in result.timestamp["word"]]


class WhisperRecognizer:
    """Whisper through faster-whisper (CTranslate2), from a local model folder."""

    name = "whisper"

    def __init__(self, model: Path | None):
        try:
            from faster_whisper import WhisperModel
        except ImportError as error:
            raise MissingDependency("the whisper recogniser needs faster-whisper: pip install faster-whisper") from error
        if model is None or not Path(model).is_dir():
            raise MissingDependency(f"whisper weights not found: give --asr-model PATH to a local faster-whisper model "
                                    f"folder{'' if model is None else f', not {model}'}")
        self._model = WhisperModel(str(model))

    def words(self, samples: np.ndarray) -> list[tuple[str, float, float]]:
        segments, _ = self._model.transcribe(samples, word_timestamps=True, language="en")
        return [(w.word.strip(), float(w.start), float(w.end)) for s in segments for w in (s.words or [])]


def make_recognizer(name: str = "pocketsphinx", model: Path | None = None) -> Recognizer:
    if name == "pocketsphinx":
        return PocketsphinxRecognizer()
    if name == "parakeet":
        return ParakeetRecognizer(model)
    if name == "whisper":
        return WhisperRecognizer(model)
    raise MissingDependency(f"unknown recogniser {name!r}; choose one of {', '.join(BACKENDS)}")
