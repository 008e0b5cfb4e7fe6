"""Personas, voices and uploaded voices of one model, in one place: the live server and the offline path both
ask a ``PersonaStore`` for a persona's system prompt.

A store

- resolves a voice request to a file: a preset name inside the model's voice folder (the reference client's
  ``NATF0.pt`` also finds ``NATF0.wav``), an uploaded voice (``upload-<digest>``) or, for the command line's own
  user only, a path;
- decodes and Mimi-encodes each voice file once per file version (``VOICE_CACHE_SIZE`` kept), and keeps the
  last ``PROMPT_CACHE_SIZE`` system prompts by (voice file, text prompt), so a persona seen before costs nothing;
- checks and keeps uploaded voice samples in a temporary folder of its own, under a count and a byte cap
  (least recently used forgotten first); a refused sample leaves nothing on disk;
- raises ``PersonaError`` for every persona that cannot be built, with a message that, for network clients,
  names no folder of the server.

It is thread-safe and synchronous: the live server runs its builds on threads of its own
(``serving/persona_builds.py``: admission, bounded queue, one build for callers who ask at once); the offline
path builds in its own thread before the first frame.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .audio import AudioLimits
from .errors import PersonaplexError
from .persona import (
    AUDIO_SUFFIXES,
    SAVED_VOICE_SUFFIXES,
    BuildCancelled,
    PromptTooLongError,
    SystemPrompt,
    VoicePrompt,
    VoicePromptError,
    available_voices,
    build_system_prompt,
    load_voice,
    resolve_voice,
)

DEFAULT_VOICE = "NATF2"  # the reference's default preset
UPLOAD_PREFIX = "upload-"
MAX_VOICE_NAME_BYTES = 255  # a file name's limit: longer names are refused before touching the file system
VOICE_CACHE_SIZE = 16  # decoded and encoded voices kept (a new text prompt with a known voice is cheap)
PROMPT_CACHE_SIZE = 32  # system prompts kept, by (voice file, text prompt)


class PersonaError(PersonaplexError):
    """The requested persona cannot be built (unknown voice, prompt too long, upload refused...)."""


@dataclass(frozen=True)
class UploadLimits:
    """What a store keeps of uploaded voice samples."""

    max_bytes: int = 10 << 20  # one uploaded file
    max_count: int = 32  # uploaded voices kept; past it the least recently used is forgotten
    max_total_bytes: int = 128 << 20  # all uploaded voices kept, together


class PersonaStore:
    """The system prompts of one model's personas: voice resolution, voice and prompt caches, uploads.

    ``model``: a loaded model (``lm``, ``mimi``, ``tokenizer``, ``voices_dir``). ``allow_paths``: True for the
    command line's own user (a voice may be any file path; messages name folders), False for network clients
    (preset names and uploads only; no message names a server folder). ``default_voice``: the preset used when a
    request names none (None, or a preset this model lacks: no voice prompt). ``max_voice_seconds``: longest voice
    audio decoded (None: no limit). ``uploads``: None refuses uploaded samples.
    """

    def __init__(self, model, *, allow_paths: bool = False, default_voice: str | None = DEFAULT_VOICE,
                 max_voice_seconds: float | None = None, uploads: UploadLimits | None = None):
        if allow_paths and uploads is not None:
            raise ValueError("uploads come from network clients: a store that allows paths takes none")
        self.model = model
        self.allow_paths = allow_paths
        self.default_voice = default_voice
        self.max_voice_seconds = max_voice_seconds
        self.uploads = uploads
        self._lock = threading.Lock()  # builds run on several threads
        self._prompts: OrderedDict[tuple[str, str], SystemPrompt] = OrderedDict()  # least recently used first
        self._voices: OrderedDict[tuple[str, int, int], VoicePrompt] = OrderedDict()  # (file, size, mtime_ns)
        self._uploaded: OrderedDict[str, Path] = OrderedDict()  # accepted uploads, least recently used first
        self._upload_dir = tempfile.TemporaryDirectory(prefix="personaplex-voices-") if uploads else None

    @property
    def upload_dir(self) -> Path | None:
        """The folder that holds the accepted uploads (None when uploads are refused)."""
        return Path(self._upload_dir.name) if self._upload_dir is not None else None

    def close(self) -> None:
        """Delete the uploaded samples; the store takes no upload afterwards."""
        if self._upload_dir is not None:
            self._upload_dir.cleanup()

    def voices(self) -> list[str]:
        """The model's voice presets (names a request may give), sorted."""
        return available_voices(self.model.voices_dir)

    # --- personas ----------------------------------------------------------------------------------------

    def system_prompt(self, voice: str | None, text_prompt: str, cancelled: Callable[[], bool] | None = None
                      ) -> SystemPrompt:
        """The system prompt of a voice request (see ``voice_path``) and a text prompt; raises ``PersonaError``."""
        return self.build(self.voice_path(voice), text_prompt, cancelled)

    def cached(self, voice_path: Path | None, text_prompt: str) -> SystemPrompt | None:
        """The system prompt already built for this voice file and text prompt, if it is still kept."""
        key = (str(voice_path), text_prompt)
        with self._lock:
            prompt = self._prompts.get(key)
            if prompt is not None:
                self._prompts.move_to_end(key)
            return prompt

    def build(self, voice_path: Path | None, text_prompt: str, cancelled: Callable[[], bool] | None = None
              ) -> SystemPrompt:
        """The system prompt of a voice file (from ``voice_path``; None: no voice) and a text prompt, from the cache
        or built (seconds for a long voice heard first). ``cancelled``: checked between encoding chunks; when it
        turns True the build stops with ``persona.BuildCancelled``. Raises ``PersonaError``."""
        prompt = self.cached(voice_path, text_prompt)
        if prompt is not None:
            return prompt
        voice = self.voice(voice_path, cancelled) if voice_path is not None else None
        try:
            prompt = build_system_prompt(self.model.lm.config, voice, self.model.tokenizer.encode_prompt(text_prompt))
        except PromptTooLongError as exc:
            raise self._error(exc) from None
        with self._lock:
            self._prompts[(str(voice_path), text_prompt)] = prompt
            while len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
        return prompt

    def voice(self, path: Path, cancelled: Callable[[], bool] | None = None, label: str | None = None
              ) -> VoicePrompt:
        """The ``VoicePrompt`` of a voice file, decoded and encoded once per file version (a new text prompt with
        a known voice costs no audio work). ``label``: what messages call the file instead of its name."""
        try:
            stat = path.stat()
        except OSError:
            raise PersonaError(f"voice {path.stem[:60]!r} is no longer available") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            voice = self._voices.get(key)
            if voice is not None:
                self._voices.move_to_end(key)
                return voice
        limits = AudioLimits(max_seconds=self.max_voice_seconds) if self.max_voice_seconds is not None else None
        try:
            voice = load_voice(path, self.model.lm.config, self.model.mimi, limits=limits, cancelled=cancelled)
        except BuildCancelled:
            raise
        except PersonaplexError as exc:  # an unreadable, too long or silent voice, a malformed voice file
            error = self._error(exc, prefix="cannot use this voice: ")
            if label:
                error = PersonaError(str(error).replace(path.name, label))
            raise error from None
        with self._lock:
            self._voices[key] = voice
            while len(self._voices) > VOICE_CACHE_SIZE:
                self._voices.popitem(last=False)
        return voice

    def voice_path(self, voice: str | None) -> Path | None:
        """The file a voice request names: an uploaded voice, a preset of the model (``NATF0`` or ``NATF0.pt``;
        a preset kept as another format is found too) or, with ``allow_paths``, a voice or audio file. None or ""
        asks for the default voice; None comes back when there is none (no voice prompt), or when None asked for
        a default this model lacks. Raises ``PersonaError``."""
        name = voice if voice else self.default_voice
        if not name:
            return None
        if not self.allow_paths and len(name.encode("utf-8", "surrogateescape")) > MAX_VOICE_NAME_BYTES:
            raise PersonaError(f"invalid voice name ({len(name.encode('utf-8', 'surrogateescape'))} bytes): preset "
                               f"names are at most {MAX_VOICE_NAME_BYTES} bytes (see GET /api/voices)")
        if name.startswith(UPLOAD_PREFIX) and not self.allow_paths:
            with self._lock:
                path = self._uploaded.get(name)
                if path is not None:
                    self._uploaded.move_to_end(name)
            if path is None:
                raise PersonaError(f"unknown uploaded voice {name[:60]!r}: upload the sample again")
            return path
        if voice is None and name not in self.voices():
            return None  # the default voice is absent from this model: no voice prompt
        try:
            return resolve_voice(name, self.model.voices_dir, allow_paths=self.allow_paths)
        except VoicePromptError as exc:
            # The reference web client asks for "NATF0.pt"; a model whose presets are audio files (the demo
            # model) holds "NATF0.wav": accept the preset name with another suffix.
            stem, dot, suffix = name.rpartition(".")
            if dot and "." + suffix.lower() in SAVED_VOICE_SUFFIXES + AUDIO_SUFFIXES and stem:
                try:
                    return resolve_voice(stem, self.model.voices_dir, allow_paths=False)
                except VoicePromptError:
                    pass
            raise self._error(exc) from None

    # --- uploaded voices ---------------------------------------------------------------------------------

    def upload_name(self, data: bytes) -> str:
        """The preset-like name (``upload-<digest>``) an uploaded sample is kept under; raises ``PersonaError``
        when uploads are off or the sample is empty or too large (before any decoding)."""
        if self.uploads is None:
            raise PersonaError("this server does not accept uploaded voices (start it with --allow-voice-upload)")
        if not data:
            raise PersonaError("the uploaded voice sample is empty")
        if len(data) > self.uploads.max_bytes:
            raise PersonaError(
                f"the uploaded voice sample has {len(data)} bytes; at most {self.uploads.max_bytes} "
                "are accepted (a few seconds of speech is enough)"
            )
        return UPLOAD_PREFIX + hashlib.sha256(data).hexdigest()[:32]

    def has_upload(self, name: str) -> bool:
        """Whether the upload ``name`` is kept (it then counts as just used)."""
        with self._lock:
            if name in self._uploaded:
                self._uploaded.move_to_end(name)
                return True
            return False

    def add_upload(self, data: bytes, cancelled: Callable[[], bool] | None = None) -> str:
        """Check an uploaded voice sample (decoded and encoded under the voice limits) and keep it; returns the
        name that ``voice_path`` then accepts. Raises ``PersonaError`` for an unusable sample, of which nothing
        stays on disk. Past the upload limits the least recently used samples are forgotten."""
        name = self.upload_name(data)
        if self.has_upload(name):
            return name
        suffix = ".ogg" if data[:4] == b"OggS" else ".flac" if data[:4] == b"fLaC" else \
            ".mp3" if data[:3] == b"ID3" or data[:2] == b"\xff\xfb" else ".wav"
        digest = name[len(UPLOAD_PREFIX):]
        checking = self.upload_dir / f"{digest}.checking{suffix}"
        checking.write_bytes(data)
        try:
            voice = self.voice(checking, cancelled, label="the uploaded sample")
            path = self.upload_dir / f"{digest}{suffix}"
            checking.replace(path)
        finally:
            checking.unlink(missing_ok=True)  # a refused (or abandoned) sample leaves nothing behind
        stat = path.stat()
        with self._lock:
            self._forget_file(checking)  # cached under its final path now
            self._voices[(str(path), stat.st_size, stat.st_mtime_ns)] = voice
            self._uploaded[name] = path
            evicted = self._evict_uploads()
        for old in evicted:
            old.unlink(missing_ok=True)
        return name

    def _evict_uploads(self) -> list[Path]:
        """Forget the least recently used uploads beyond the count and byte limits (lock held)."""
        sizes = {name: path.stat().st_size for name, path in self._uploaded.items() if path.exists()}
        evicted = []
        while self._uploaded and (len(self._uploaded) > self.uploads.max_count
                                  or sum(sizes.get(n, 0) for n in self._uploaded) > self.uploads.max_total_bytes):
            _, path = self._uploaded.popitem(last=False)
            evicted.append(path)
            self._forget_file(path)
        return evicted

    def _forget_file(self, path: Path) -> None:
        """Drop the cached voice and prompts of a file (lock held)."""
        for key in [k for k in self._voices if k[0] == str(path)]:
            self._voices.pop(key)
        for key in [k for k in self._prompts if k[0] == str(path)]:
            self._prompts.pop(key)

    # --- errors --------------------------------------------------------------------------------------------

    def _error(self, exc: Exception, prefix: str = "") -> PersonaError:
        """A ``PersonaError`` from a lower-level one; for network clients its message names no server folder
        (voices, uploads, temporary files)."""
        message = str(exc)
        if not self.allow_paths:
            folders = {tempfile.gettempdir()}
            if self.upload_dir is not None:
                folders |= {str(self.upload_dir), str(self.upload_dir.resolve())}
            if self.model.voices_dir is not None:
                folders |= {str(self.model.voices_dir), str(Path(self.model.voices_dir).resolve())}
            for folder in sorted(folders, key=len, reverse=True):
                message = message.replace(folder + "/", "").replace(folder, "<server folder>")
        if prefix and not message.startswith(prefix):
            message = prefix + message
        return PersonaError(message)
