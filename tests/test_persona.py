"""Personas: text prompt wrapping, voice resolution (safe against path tricks), prompt building."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaplex.config import TINY_LM
from personaplex.persona import (
    SILENCE_FRAMES,
    PromptTooLongError,
    VoicePrompt,
    VoicePromptError,
    build_system_prompt,
    resolve_voice,
)
from personaplex.text import wrap_system_tags


@pytest.mark.parametrize("prompt,wrapped", [
    ("You enjoy having a good conversation.", "<system> You enjoy having a good conversation. <system>"),
    ("  padded  ", "<system> padded <system>"),
    ("<system> already <system>", "<system> already <system>"),
    ("<system> only at start", "<system> <system> only at start <system>"),
    ("", ""),
    ("   ", ""),
])
def test_wrap_system_tags(prompt, wrapped):
    assert wrap_system_tags(prompt) == wrapped


@pytest.fixture
def voices(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    for name in ("NATF2.pt", "NATM1.safetensors", "VARF0.wav"):
        (folder / name).write_bytes(b"x")
    (tmp_path / "secret.pt").write_bytes(b"x")
    return folder


@pytest.mark.parametrize("request_name,expected", [("NATF2", "NATF2.pt"), ("NATF2.pt", "NATF2.pt"),
                                                   ("NATM1", "NATM1.safetensors"), ("VARF0", "VARF0.wav")])
def test_presets_resolve_inside_the_voice_folder(voices, request_name, expected):
    assert resolve_voice(request_name, voices, allow_paths=False) == (voices / expected).resolve()


@pytest.mark.parametrize("request_name", ["../secret.pt", "../secret", "/etc/passwd", "NATF2/../../secret.pt",
                                          "..", ".hidden", "", "NATF2\x00.pt", "..\\secret.pt"])
def test_path_tricks_in_preset_names_are_refused(voices, request_name):
    with pytest.raises(VoicePromptError, match="invalid voice name"):
        resolve_voice(request_name, voices, allow_paths=False)


def test_unknown_preset_lists_the_available_ones(voices):
    with pytest.raises(VoicePromptError, match="unknown voice 'NATF9'.*NATF2, NATM1, VARF0"):
        resolve_voice("NATF9", voices, allow_paths=False)


def test_command_line_may_name_voice_files_but_not_arbitrary_files(voices, tmp_path):
    assert resolve_voice(str(tmp_path / "secret.pt"), voices) == tmp_path / "secret.pt"
    with pytest.raises(VoicePromptError, match="invalid voice"):
        resolve_voice("/etc/passwd", voices)
    with pytest.raises(VoicePromptError, match="not found"):
        resolve_voice(str(tmp_path / "absent.wav"), voices)


def test_empty_text_prompt_skips_the_text_phase():
    voice = VoicePrompt("codes", codes=torch.zeros(5, 8, dtype=torch.long))
    with_text = build_system_prompt(dataclasses.replace(TINY_LM, context=3000), voice, [7, 8, 9])
    without = build_system_prompt(dataclasses.replace(TINY_LM, context=3000), voice, [])
    assert with_text.frames.shape[0] == 5 + 2 * SILENCE_FRAMES + 3
    assert without.frames.shape[0] == 5 + 2 * SILENCE_FRAMES
    assert (without.frames[:, 0] == TINY_LM.existing_text_padding_id).all()


def test_prompt_longer_than_the_context_is_refused():
    voice = VoicePrompt("codes", codes=torch.zeros(5, 8, dtype=torch.long))
    with pytest.raises(PromptTooLongError, match="shorten the text prompt"):
        build_system_prompt(TINY_LM, voice, [5] * 10)  # the tiny context is 24 frames
