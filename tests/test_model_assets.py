"""Asset resolution through the real huggingface_hub code paths, with no network.

The Hub is replaced by what huggingface_hub itself reads: a cache directory in the real layout
(``models--org--name/{blobs,refs,snapshots}``) and, for the online cases, a small local HTTP server
answering like the Hub (headers ``X-Repo-Commit``, ``ETag``, ``X-Error-Code``). huggingface_hub reads
its environment once, at import, into ``huggingface_hub.constants``; in-process tests therefore set
those constants (as huggingface_hub's own tests do) and one subprocess test checks that the plain
environment variables are honoured end to end.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.utils._http
import pytest

from personaplex.model_assets import (
    DEFAULT_REPO,
    LM_FILE,
    MIMI_FILE,
    TOKENIZER_FILE,
    VOICES_ARCHIVE,
    AssetError,
    extract_voices,
    resolve_assets,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def voices_archive_bytes(names: tuple[str, ...] = ("NATF2.pt", "NATM0.pt")) -> bytes:
    """A small valid voices.tgz: top-level voices/ with a few files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo("voices")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name in names:
            data = f"voice {name}".encode()
            info = tarfile.TarInfo(f"voices/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


REPO_FILES = {
    LM_FILE: b"lm weights",
    MIMI_FILE: b"mimi weights",
    TOKENIZER_FILE: b"tokenizer model",
    VOICES_ARCHIVE: voices_archive_bytes(),
}


def write_fake_cache(cache: Path, files: dict[str, bytes], repo_id: str = DEFAULT_REPO) -> Path:
    """Lay files out exactly as huggingface_hub caches them; returns the snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True)
    (storage / "refs").mkdir()
    snapshot.mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / blob)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline mode off, no token."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # No saved login either: the token file lives under HF_HOME.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    return cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- cache and offline mode ----------------------------------------------------------------------


def test_offline_cache_hit_resolves_every_file(hf_cache, offline):
    snapshot = write_fake_cache(hf_cache, REPO_FILES)
    assets = resolve_assets(progress=False)
    assert assets.lm_weights == snapshot / LM_FILE
    assert assets.mimi_weights.read_bytes() == b"mimi weights"
    assert assets.tokenizer.read_bytes() == b"tokenizer model"
    assert assets.voices_dir == snapshot / "voices"
    assert sorted(p.name for p in assets.voices_dir.iterdir()) == ["NATF2.pt", "NATM0.pt"]
    assert assets.preset == "personaplex-7b" and not assets.untrained


def test_voices_are_extracted_once(hf_cache, offline):
    snapshot = write_fake_cache(hf_cache, REPO_FILES)
    first = resolve_assets(progress=False).voices_dir
    (first / "NATF2.pt").write_bytes(b"edited")  # a second run must not extract again
    assert resolve_assets(progress=False).voices_dir == first
    assert (first / "NATF2.pt").read_bytes() == b"edited"
    assert [p.name for p in snapshot.iterdir() if p.name.startswith(".voices-")] == []


def test_offline_missing_file_names_it_and_the_flags(hf_cache, offline):
    write_fake_cache(hf_cache, {k: v for k, v in REPO_FILES.items() if k != LM_FILE})
    with pytest.raises(AssetError) as error:
        resolve_assets(progress=False)
    message = str(error.value)
    assert LM_FILE in message and "HF_HUB_OFFLINE" in message and "--moshi-weight" in message
    assert "\n" not in message


def test_voices_not_needed_is_not_fetched(hf_cache, offline):
    write_fake_cache(hf_cache, {k: v for k, v in REPO_FILES.items() if k != VOICES_ARCHIVE})
    assets = resolve_assets(need_voices=False, progress=False)
    assert assets.voices_dir is None


def test_local_flags_override_the_hub(hf_cache, offline, tmp_path):
    # An empty cache in offline mode: any attempt to use the hub would fail.
    local = {}
    for name in ("lm.safetensors", "mimi.safetensors", "tok.model"):
        local[name] = tmp_path / name
        local[name].write_bytes(b"x")
    voices = tmp_path / "my_voices"
    voices.mkdir()
    assets = resolve_assets(
        moshi_weight=local["lm.safetensors"], mimi_weight=str(local["mimi.safetensors"]),
        tokenizer=local["tok.model"], voice_prompt_dir=voices,
    )
    assert (assets.lm_weights, assets.mimi_weights, assets.tokenizer, assets.voices_dir) == (
        local["lm.safetensors"], local["mimi.safetensors"], local["tok.model"], voices,
    )
    assert assets.preset is None  # a local LM file may be anything; the caller detects it


def test_missing_local_flag_file_is_a_clear_error(tmp_path):
    with pytest.raises(AssetError, match="--moshi-weight .*file not found"):
        resolve_assets(moshi_weight=tmp_path / "nope.safetensors")
    with pytest.raises(AssetError, match="--voice-prompt-dir .* is not a directory"):
        resolve_assets(voice_prompt_dir=tmp_path / "nope")


def test_local_snapshot_folder_as_repo(tmp_path, hf_cache, offline):
    folder = tmp_path / "snapshot"
    folder.mkdir()
    for name, data in REPO_FILES.items():
        (folder / name).write_bytes(data)
    assets = resolve_assets(str(folder))
    assert assets.lm_weights == folder / LM_FILE and assets.voices_dir == folder / "voices"
    assert (assets.voices_dir / "NATF2.pt").is_file()
    assert assets.preset is None

    (folder / MIMI_FILE).unlink()
    with pytest.raises(AssetError, match=f"{MIMI_FILE} not found in the local repo folder .*--mimi-weight"):
        resolve_assets(str(folder))
    with pytest.raises(AssetError, match="no such folder"):
        resolve_assets(str(tmp_path / "missing_snapshot"))


def test_environment_variables_are_honoured_end_to_end(tmp_path):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as plain environment variables, read by huggingface_hub itself."""
    cache = tmp_path / "env_cache"
    snapshot = write_fake_cache(cache, REPO_FILES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO_ROOT))
    script = "from personaplex.model_assets import resolve_assets; print(resolve_assets(progress=False).lm_weights)"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(snapshot / LM_FILE)


# --- a local server that answers like the Hub ----------------------------------------------------


class FakeHub:
    """Serves ``files`` of one repo at ``/<repo>/resolve/main/<file>``, or one fixed error answer."""

    def __init__(self, files: dict[str, bytes], error: tuple[int, dict[str, str]] | None = None):
        self.files, self.error, self.requests = files, error, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                hub.requests.append((self.command, self.path, self.headers.get("authorization")))
                if hub.error is not None:
                    status, headers = hub.error
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                prefix = f"/{DEFAULT_REPO}/resolve/main/"
                name = self.path[len(prefix):] if self.path.startswith(prefix) else None
                if name not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files[name]
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@contextlib.contextmanager
def serving(files: dict[str, bytes], error: tuple[int, dict[str, str]] | None = None) -> Iterator[FakeHub]:
    """A running ``FakeHub`` on a free localhost port, shut down on exit."""
    hub = FakeHub(files, error)
    thread = threading.Thread(target=hub.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.server.shutdown()
        hub.server.server_close()


def test_download_through_a_hub_endpoint(hf_cache):
    with serving(REPO_FILES) as hub:
        assets = resolve_assets(endpoint=hub.url, progress=False)
    snapshot = hf_cache / "models--nvidia--personaplex-7b-v1" / "snapshots" / COMMIT
    assert assets.lm_weights == snapshot / LM_FILE and assets.lm_weights.read_bytes() == b"lm weights"
    assert (assets.voices_dir / "NATM0.pt").read_bytes() == b"voice NATM0.pt"
    assert {path for method, path, _ in hub.requests if method == "GET"} == {
        f"/{DEFAULT_REPO}/resolve/main/{name}" for name in REPO_FILES
    }


GATED = {"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {DEFAULT_REPO} is restricted."}


@pytest.mark.parametrize("status", [401, 403])
def test_gated_repo_says_accept_licence_and_set_token(hf_cache, status):
    with serving({}, error=(status, GATED)) as hub, pytest.raises(AssetError) as error:
        resolve_assets(endpoint=hub.url, progress=False)
    message = str(error.value)
    assert f"accept the licence at {hub.url}/{DEFAULT_REPO}" in message
    assert "HF_TOKEN=" in message and "--moshi-weight/--mimi-weight/--tokenizer/--voice-prompt-dir" in message
    assert f"HTTP {status}" in message and "\n" not in message


def test_gated_repo_with_a_token_sends_it_and_says_which_account(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    expected = "accept the licence .* account of the token in use"
    with serving({}, error=(403, GATED)) as hub, pytest.raises(AssetError, match=expected):
        resolve_assets(endpoint=hub.url, progress=False)
    assert hub.requests[0][2] == "Bearer hf_test_token"


def test_unknown_repo_says_check_hf_repo(hf_cache):
    expected = "repo nvidia/personaplex-7b-v1 not found .*check --hf-repo"
    with serving({}, error=(401, {"X-Error-Code": "RepoNotFound"})) as hub, pytest.raises(AssetError, match=expected):
        resolve_assets(endpoint=hub.url, progress=False)


def test_missing_file_in_repo_says_check_hf_repo(hf_cache):
    files = {k: v for k, v in REPO_FILES.items() if k != MIMI_FILE}
    expected = f"{MIMI_FILE} not found in repo .*check --hf-repo, or pass --mimi-weight"
    with serving(files) as hub, pytest.raises(AssetError, match=expected):
        resolve_assets(endpoint=hub.url, progress=False)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def instant_retries(monkeypatch):
    """huggingface_hub retries refused connections and 5xx answers five times with growing sleeps
    (23 s in all); only its own clock is made instant here, the request path stays real."""
    instant = types.ModuleType("time")
    instant.__dict__.update(vars(time))
    instant.sleep = lambda seconds: None
    monkeypatch.setattr(huggingface_hub.utils._http, "time", instant)


def test_unreachable_hub_without_cache(hf_cache, instant_retries):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(AssetError) as error:
        resolve_assets(endpoint=url, progress=False)
    message = str(error.value)
    assert f"cannot reach {url}" in message and TOKENIZER_FILE in message and "--tokenizer" in message
    assert "connect once to fill the cache" in message and "\n" not in message


@pytest.mark.parametrize("status", [403, 500])
def test_other_hub_answers_are_reported_with_their_status(hf_cache, instant_retries, status):
    expected = f"HTTP {status} for {TOKENIZER_FILE}"
    with serving({}, error=(status, {})) as hub, pytest.raises(AssetError, match=expected) as error:
        resolve_assets(endpoint=hub.url, progress=False)
    if status == 403:  # a refused token: the licence / token advice applies
        assert "accept the licence" in str(error.value)
    else:
        assert "try again later" in str(error.value)


def test_invalid_repo_id(hf_cache):
    with pytest.raises(AssetError, match="neither a repo id .* nor an existing folder"):
        resolve_assets("not a repo!!", progress=False)


def test_unreachable_hub_uses_the_cache(hf_cache):
    snapshot = write_fake_cache(hf_cache, REPO_FILES)
    assets = resolve_assets(endpoint=f"http://127.0.0.1:{closed_port()}", progress=False)
    assert assets.lm_weights == snapshot / LM_FILE


# --- voices.tgz safety ---------------------------------------------------------------------------


def tar_with(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    folder = tmp_path / "snap"
    folder.mkdir(exist_ok=True)
    archive = folder / VOICES_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return archive


def file_member(name: str, data: bytes = b"evil") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def device_member(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, None


@pytest.mark.parametrize(
    "member, reason",
    [
        (lambda root: file_member("../evil"), "unsafe path"),
        (lambda root: file_member("voices/../../evil"), "unsafe path"),
        (lambda root: file_member(str(root / "absolute_evil")), "unsafe path"),
        (lambda root: file_member("elsewhere/evil"), "unsafe path"),
        (lambda root: link_member("voices/passwd.pt", "/etc/passwd", tarfile.SYMTYPE), "a link"),
        (lambda root: link_member("voices/up.pt", "../../evil", tarfile.SYMTYPE), "a link"),
        (lambda root: link_member("voices/hard.pt", "/etc/passwd", tarfile.LNKTYPE), "a link"),
        (lambda root: device_member("voices/null.pt"), "a special file"),
    ],
)
def test_malicious_archives_are_refused_and_nothing_is_written(tmp_path, member, reason):
    root = tmp_path / "outside"
    root.mkdir()
    archive = tar_with(tmp_path, file_member("voices/NATF0.pt", b"fine"), member(root))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(AssetError, match=reason) as error:
        extract_voices(archive)
    assert "refusing to extract" in str(error.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_corrupt_archive_says_delete_and_redownload(tmp_path):
    folder = tmp_path / "snap"
    folder.mkdir()
    archive = folder / VOICES_ARCHIVE
    archive.write_bytes(voices_archive_bytes()[:40])  # truncated download
    with pytest.raises(AssetError, match="corrupt .*delete .* downloaded again.*--voice-prompt-dir"):
        extract_voices(archive)
    archive.write_bytes(b"not an archive at all")
    with pytest.raises(AssetError, match="corrupt"):
        extract_voices(archive)
    assert sorted(p.name for p in folder.iterdir()) == [VOICES_ARCHIVE]


def test_archive_without_voices_folder_is_refused(tmp_path):
    archive = tar_with(tmp_path, (tarfile.TarInfo("voices"), None))
    archive.unlink()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz"):
        pass
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(AssetError, match="no top-level 'voices/' folder"):
        extract_voices(archive)
    assert not (archive.parent / "voices").exists()


def test_dot_prefixed_archive_is_accepted(tmp_path):
    dot = tarfile.TarInfo(".")
    dot.type = tarfile.DIRTYPE
    archive = tar_with(tmp_path, (dot, None), file_member("./voices/VARF1.pt", b"ok"))
    assert (extract_voices(archive) / "VARF1.pt").read_bytes() == b"ok"
