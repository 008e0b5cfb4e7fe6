"""The persona store on the demo model: prompts and voices kept by key, voice resolution for network clients and
for the command line, uploads under their limits, messages that name no server folder, and the hub building a
persona asked for by two callers at once only once."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile

import pytest

from personaplex.demo import synthesize_voice, wav_bytes
from personaplex.persona import BuildCancelled
from personaplex.persona_store import (
    MAX_VOICE_NAME_BYTES,
    PROMPT_CACHE_SIZE,
    UPLOAD_PREFIX,
    PersonaError,
    PersonaStore,
    UploadLimits,
)


@pytest.fixture
def voices_model(demo_model, tmp_path):
    """The demo model with a voice folder of its own: NATF2 and NATM1 copied, and a broken file."""
    folder = tmp_path / "voices"
    folder.mkdir()
    for name in ("NATF2", "NATM1"):
        shutil.copy(demo_model.voices_dir / f"{name}.wav", folder / f"{name}.wav")
    (folder / "BROKEN.wav").write_bytes(b"RIFF....WAVEfmt not really")
    return dataclasses.replace(demo_model, voices_dir=folder)


def sample(name: str, seconds: float = 1.0) -> bytes:
    return wav_bytes(synthesize_voice(name, seconds=seconds))


# --- caches ------------------------------------------------------------------------------------------------


def test_a_persona_is_kept_by_voice_file_and_text(demo_model):
    store = PersonaStore(demo_model)
    first = store.system_prompt("NATF2", "hello")
    # The same file under another name (the reference client's ".pt", the default voice): the same prompt.
    assert store.system_prompt("NATF2.pt", "hello") is first
    assert store.system_prompt(None, "hello") is first
    assert store.cached(store.voice_path("NATF2"), "hello") is first
    other_text = store.system_prompt("NATF2", "goodbye")
    assert other_text is not first
    voice_frames = store.voice(store.voice_path("NATF2")).num_frames
    assert voice_frames > 0 and (other_text.frames[:voice_frames] == first.frames[:voice_frames]).all()
    # Another voice file is another persona (the demo's random Mimi may give two voices the same codes).
    other_voice = store.system_prompt("NATM1", "hello")
    assert other_voice is not first and store.cached(store.voice_path("NATM1"), "hello") is other_voice
    assert store.voice(store.voice_path("NATM1")).source.endswith("NATM1.wav")


def test_the_prompt_cache_forgets_the_least_recently_used(demo_model):
    store = PersonaStore(demo_model)
    path = store.voice_path("NATF2")
    oldest = store.system_prompt("NATF2", "prompt 0")
    for index in range(1, PROMPT_CACHE_SIZE + 1):
        store.system_prompt("NATF2", f"prompt {index}")
        if index == 1:
            assert store.cached(path, "prompt 0") is oldest  # used again: now the most recent
    assert store.cached(path, "prompt 0") is oldest
    assert store.cached(path, "prompt 1") is None  # the least recently used one was forgotten
    assert store.cached(path, f"prompt {PROMPT_CACHE_SIZE}") is not None


def test_a_voice_is_encoded_once_per_file_version(voices_model):
    store = PersonaStore(voices_model)
    path = store.voice_path("NATF2")
    voice = store.voice(path)
    assert store.voice(path) is voice
    path.write_bytes(sample("NATM9", 2.0))  # another recording under the same name
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new version even on a coarse clock
    again = store.voice(path)
    assert again is not voice and again.num_frames != voice.num_frames
    assert store.voice(path) is again


# --- voice resolution --------------------------------------------------------------------------------------


def test_network_clients_get_presets_only_and_no_server_folder(voices_model):
    store = PersonaStore(voices_model)
    folder = voices_model.voices_dir
    assert store.voices() == ["BROKEN", "NATF2", "NATM1"]
    assert store.voice_path("NATF2.pt") == (folder / "NATF2.wav").resolve()
    for bad in ("../NATF2", "/etc/passwd", "NATF2/../../x", ".hidden", str(folder / "NATF2.wav")):
        with pytest.raises(PersonaError, match="invalid voice name"):
            store.voice_path(bad)
    with pytest.raises(PersonaError, match=f"at most {MAX_VOICE_NAME_BYTES} bytes"):
        store.voice_path("N" * (MAX_VOICE_NAME_BYTES + 1))
    with pytest.raises(PersonaError, match="unknown uploaded voice"):
        store.voice_path(UPLOAD_PREFIX + "0123456789abcdef")
    messages = []
    for name, words in (("NOBODY", "unknown voice 'NOBODY'; available: BROKEN, NATF2, NATM1"),
                        ("BROKEN", "cannot use this voice: ")):
        with pytest.raises(PersonaError, match=words) as error:
            store.system_prompt(name, "x")
        messages.append(str(error.value))
    with pytest.raises(PersonaError, match="leaving less than") as error:
        store.system_prompt("NATF2", "word " * 4000)
    messages.append(str(error.value))
    for message in messages:
        for secret in (str(folder), str(folder.resolve()), tempfile.gettempdir()):
            assert secret not in message, message


def test_the_default_voice(voices_model):
    assert PersonaStore(voices_model).voice_path(None).name == "NATF2.wav"
    assert PersonaStore(voices_model, default_voice="NATM1").voice_path("").name == "NATM1.wav"
    absent = PersonaStore(voices_model, default_voice="NOBODY")
    assert absent.voice_path(None) is None  # a default this model lacks: no voice prompt
    assert absent.system_prompt(None, "x").saved_voice is None
    assert PersonaStore(voices_model, default_voice=None).voice_path(None) is None


def test_the_command_line_names_files_and_folders(voices_model, tmp_path):
    store = PersonaStore(voices_model, allow_paths=True)
    elsewhere = tmp_path / "speaker.wav"
    elsewhere.write_bytes(sample("VARF3"))
    assert store.voice_path(str(elsewhere)) == elsewhere
    voiceless = PersonaStore(voices_model, default_voice=None).system_prompt(None, "x")
    assert store.system_prompt(str(elsewhere), "x").num_steps == store.voice(elsewhere).num_frames + voiceless.num_steps
    with pytest.raises(PersonaError, match=f"unknown voice 'NOBODY'; available in {voices_model.voices_dir}"):
        store.voice_path("NOBODY")
    with pytest.raises(PersonaError, match="invalid voice"):
        store.voice_path("/etc/passwd")
    with pytest.raises(PersonaError, match="leaving less than"):
        store.system_prompt("NATF2", "word " * 4000)
    # The same preset gives the same system prompt as for a network client.
    assert store.system_prompt("NATF2", "hi").fingerprint() == PersonaStore(voices_model).system_prompt("NATF2", "hi") \
        .fingerprint()
    with pytest.raises(ValueError, match="uploads come from network clients"):
        PersonaStore(voices_model, allow_paths=True, uploads=UploadLimits())


# --- uploads -----------------------------------------------------------------------------------------------


def test_uploads_refused_when_off_empty_or_too_large(demo_model):
    with pytest.raises(PersonaError, match="--allow-voice-upload"):
        PersonaStore(demo_model).add_upload(sample("NATF5"))
    store = PersonaStore(demo_model, uploads=UploadLimits(max_bytes=1000))
    try:
        with pytest.raises(PersonaError, match="empty"):
            store.add_upload(b"")
        with pytest.raises(PersonaError, match="at most 1000 are accepted"):
            store.add_upload(b"RIFF" + bytes(1000))
        assert list(store.upload_dir.iterdir()) == []
    finally:
        store.close()


def test_an_unusable_or_abandoned_upload_leaves_nothing(demo_model):
    store = PersonaStore(demo_model, max_voice_seconds=2.0, uploads=UploadLimits())
    try:
        with pytest.raises(PersonaError, match="cannot use this voice: .*the uploaded sample") as error:
            store.add_upload(b"RIFF not really a wav file at all")
        assert store.upload_dir.name not in str(error.value)
        with pytest.raises(PersonaError, match="limited to 2 s"):
            store.add_upload(sample("NATF5", 3.0))
        with pytest.raises(BuildCancelled):
            store.add_upload(sample("NATF6", 1.0), cancelled=lambda: True)
        assert list(store.upload_dir.iterdir()) == []
    finally:
        store.close()
    assert not store.upload_dir.exists()


def test_uploads_are_kept_once_and_under_the_count_cap(demo_model):
    samples = [sample(f"VARF{index}") for index in range(3)]
    store = PersonaStore(demo_model, uploads=UploadLimits(max_count=2))
    try:
        first = store.add_upload(samples[0])
        assert first.startswith(UPLOAD_PREFIX) and store.add_upload(samples[0]) == first  # the same sample: kept once
        path = store.voice_path(first)
        assert path.parent == store.upload_dir and len(list(store.upload_dir.iterdir())) == 1
        prompt = store.system_prompt(first, "x")
        assert store.system_prompt(first, "x") is prompt
        second = store.add_upload(samples[1])
        store.voice_path(first)  # used again: now the most recent
        third = store.add_upload(samples[2])  # the least recently used (second) is forgotten
        assert [store.has_upload(n) for n in (first, second, third)] == [True, False, True]
        assert len(list(store.upload_dir.iterdir())) == 2
        with pytest.raises(PersonaError, match="unknown uploaded voice .* upload the sample again"):
            store.voice_path(second)
    finally:
        store.close()


def test_uploads_are_kept_under_the_byte_cap(demo_model):
    samples = [sample(f"VARM{index}", 1.0 + 0.1 * index) for index in range(4)]
    store = PersonaStore(demo_model, uploads=UploadLimits(max_total_bytes=len(samples[2]) + len(samples[3])))
    try:
        first, second = store.add_upload(samples[0]), store.add_upload(samples[1])
        path = store.voice_path(second)
        store.system_prompt(second, "x")
        assert store.has_upload(first)  # used again: second is now the least recently used
        fourth = store.add_upload(samples[3])  # all three exceed the bytes: second is forgotten
        assert [store.has_upload(n) for n in (first, second, fourth)] == [True, False, True]
        assert sorted(p.stat().st_size for p in store.upload_dir.iterdir()) == [len(samples[0]), len(samples[3])]
        assert store.cached(path, "x") is None  # a forgotten upload's persona goes with it
    finally:
        store.close()


# --- the hub ----------------------------------------------------------------------------------------------


def test_the_hub_builds_a_persona_asked_for_at_once_only_once(demo_model):
    from personaplex.serving import ConversationHub, HubOptions, PersonaRequest

    async def main():
        hub = ConversationHub(demo_model, HubOptions(max_conversations=1, tick_seconds=0, allow_voice_upload=True))
        try:
            request = PersonaRequest("the same persona", voice_audio=sample("VARM7"))
            first, second = await asyncio.gather(hub.build_persona(request), hub.build_persona(request))
            [upload] = list(hub.personas.upload_dir.iterdir())
            name = UPLOAD_PREFIX + upload.stem
            return first, second, hub._builds.started, hub.personas.cached(hub.personas.voice_path(name),
                                                                           "the same persona")
        finally:
            await hub.close()

    first, second, builds, cached = asyncio.run(main())
    assert first is second is cached
    assert builds == 2  # one upload check and one persona build, shared by both callers
