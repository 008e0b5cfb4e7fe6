"""Start-up progress lines and the persistent compile cache (no GPU needed)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest

from personaplex import startup
from personaplex.compile_cache import compile_cache_dir, use_persistent_compile_cache

ROOT = Path(__file__).resolve().parents[1]


def bench_startup():
    """bench/startup.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_startup", ROOT / "bench" / "startup.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def test_phase_lines_are_what_the_start_up_bench_reads(caplog):
    caplog.set_level(logging.INFO, logger="personaplex.startup")
    with startup.phase("step graph, batch 8 (4/11)", "2 graphs", announce=True):
        pass
    startup.report("prefill graphs", 3.456)
    stamp = "2026-12-02 10:00:00,000 INFO personaplex.startup:"  # the server's logging format
    lines = [(0.0, f"{stamp} {record.getMessage()}") for record in caplog.records]
    assert caplog.records[0].getMessage() == "start-up: step graph, batch 8 (4/11) ..."
    found = bench_startup().phases(lines)
    expected = [("step graph, batch 8 (4/11)", "2 graphs"), ("prefill graphs", "")]
    assert [(p["phase"], p["detail"]) for p in found] == expected
    assert found[1]["seconds"] == pytest.approx(3.46) and 0 <= found[0]["seconds"] < 1


def test_process_age_counts_from_the_process_start():
    assert 0 < startup.seconds_since_process_start() < 24 * 3600


def test_compile_cache_goes_to_the_user_cache_directory(tmp_path, monkeypatch):
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "PERSONAPLEX_COMPILE_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = use_persistent_compile_cache()
    assert root == tmp_path / "xdg" / "personaplex" / "compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(root / "inductor") and (root / "inductor").is_dir()
    assert os.environ["TRITON_CACHE_DIR"] == str(root / "triton")


def test_compile_cache_leaves_chosen_directories_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("PERSONAPLEX_COMPILE_CACHE", str(tmp_path / "chosen"))
    assert use_persistent_compile_cache() == tmp_path / "chosen"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "chosen" / "triton")
    monkeypatch.setenv("PERSONAPLEX_COMPILE_CACHE", "off")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    assert compile_cache_dir() is None and use_persistent_compile_cache() is None
    assert "TRITON_CACHE_DIR" not in os.environ


def test_kernel_set_choice(monkeypatch):
    import torch

    from personaplex.engine.kernels import GPU_DEFAULT, resolve_kernel_set, triton_available

    monkeypatch.delenv("PERSONAPLEX_KERNELS", raising=False)
    monkeypatch.delenv("PERSONAPLEX_NO_COMPILE", raising=False)
    assert resolve_kernel_set("auto", torch.device("cpu")) == "eager"
    assert resolve_kernel_set("triton", torch.device("cpu")) == "triton"
    assert GPU_DEFAULT == "triton"  # a GPU server starts in seconds: nothing is compiled by default
    if triton_available():
        assert resolve_kernel_set("auto", torch.device("cuda")) == GPU_DEFAULT
        monkeypatch.setenv("PERSONAPLEX_NO_COMPILE", "1")
        assert resolve_kernel_set("auto", torch.device("cuda")) != "compile"
    monkeypatch.setenv("PERSONAPLEX_KERNELS", "triton")
    assert resolve_kernel_set("auto", torch.device("cpu")) == "triton"
    monkeypatch.setenv("PERSONAPLEX_KERNELS", "fastest")
    with pytest.raises(ValueError, match="PERSONAPLEX_KERNELS"):
        resolve_kernel_set("auto", torch.device("cpu"))
