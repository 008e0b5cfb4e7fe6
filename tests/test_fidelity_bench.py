"""bench/fidelity.py runs on a CPU with the tiny layout and reports sane numbers (the GPU numbers are in
bench/NOTES.md): float32 eager against itself exactly, bf16 and the Triton kernels (interpreted) close."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_triton_kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fidelity_bench_on_the_tiny_layout(tmp_path):
    require_triton_kernels()
    out = tmp_path / "fidelity.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fidelity.py"), "--preset", "tiny", "--device", "cpu", "--steps", "6",
         "--paths", "f32-eager", "bf16-eager", "triton", "compile", "--checkpoint", str(tmp_path / "lm.safetensors"),
         "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| path | text logits rel. RMS error |" in done.stdout
    rows = {row["path"]: row for row in json.loads(out.read_text())["rows"]}

    again = rows["f32-eager"]  # the reference path rerun: bit for bit the same
    assert again["text_rel_rms"] == 0 and again["audio_rel_rms"] == 0
    assert again["text_argmax_agreement"] == 1 and again["audio_argmax_agreement"] == 1

    for name in ("bf16-eager", "triton"):  # bf16 rounding: about 1e-2 relative, argmax nearly always the same
        row = rows[name]
        assert 1e-4 < row["text_rel_rms"] < 0.05 and 1e-4 < row["audio_rel_rms"] < 0.05, row
        assert row["text_argmax_agreement"] >= 0.5 and row["audio_argmax_agreement"] >= 0.8, row

    assert "CUDA" in rows["compile"]["error"]  # refused on a CPU, said in the table, the others still ran
    assert "| compile | not run: the compile kernels need a CUDA device |" in done.stdout
