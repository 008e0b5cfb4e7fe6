"""Where weights and assets come from: local files, a local snapshot folder, or the Hugging Face Hub.

Every file that is not given locally goes through ``huggingface_hub.hf_hub_download``, so the
standard cache and all of huggingface_hub's environment variables (``HF_TOKEN``, ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``) behave as users know them. Hub failures are
turned into one-line ``AssetError`` messages that name the missing file and the flag that avoids it.

The voice presets ship as ``voices.tgz`` (top-level folder ``voices/``); it is extracted once, next
to the archive, as the reference does, but safely: members are validated, links and devices are
refused, and the folder appears atomically (extracted into a temporary folder, then renamed).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import PersonaplexError

DEFAULT_REPO = "nvidia/personaplex-7b-v1"
DEFAULT_PRESET = "personaplex-7b"  # the preset the files of DEFAULT_REPO fit
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_ARCHIVE = "voices.tgz"
VOICES_FOLDER = "voices"  # the archive's top-level folder, and the folder it is extracted to

LOCAL_FLAGS = "--moshi-weight/--mimi-weight/--tokenizer/--voice-prompt-dir"


class AssetError(PersonaplexError):
    """A weights, tokenizer or voice file cannot be found, downloaded or unpacked."""


@dataclass(frozen=True)
class ModelAssets:
    """Local paths of everything a model needs."""

    lm_weights: Path
    mimi_weights: Path
    tokenizer: Path
    voices_dir: Path | None  # directory holding voice presets (NATF2.pt ...), None if not requested
    preset: str | None = None  # preset name from personaplex.config.PRESETS when known, else None (caller detects)
    untrained: bool = False  # True for the demo model: outputs are noise


def resolve_assets(
    hf_repo: str = DEFAULT_REPO,
    *,
    moshi_weight: str | Path | None = None,
    mimi_weight: str | Path | None = None,
    tokenizer: str | Path | None = None,
    voice_prompt_dir: str | Path | None = None,
    need_voices: bool = True,
    progress: bool = True,
    endpoint: str | None = None,
) -> ModelAssets:
    """Local paths of the LM weights, Mimi weights, text tokenizer and (optionally) voice presets.

    Files given as arguments are used as they are (they must exist). Every other file is taken from
    ``hf_repo``: a local folder holding the repository's files (e.g. a snapshot copied from another
    machine), or a Hub repo id downloaded through the Hugging Face cache. ``voices.tgz`` is fetched
    only when ``need_voices`` and no ``voice_prompt_dir`` is given. ``progress`` shows
    huggingface_hub's download bars. ``endpoint`` overrides the Hub URL (default: huggingface_hub's,
    i.e. ``HF_ENDPOINT`` or https://huggingface.co). Raises ``AssetError`` with what to do next.
    """
    local = {
        "lm": _local_file(moshi_weight, "--moshi-weight"),
        "mimi": _local_file(mimi_weight, "--mimi-weight"),
        "tokenizer": _local_file(tokenizer, "--tokenizer"),
    }
    voices_dir = None
    if voice_prompt_dir is not None:
        voices_dir = Path(voice_prompt_dir).expanduser()
        if not voices_dir.is_dir():
            raise AssetError(
                f"--voice-prompt-dir {voices_dir} is not a directory; give the folder holding the voice files"
            )

    source = _source_for(hf_repo, endpoint, progress)
    # Small files first: an access problem shows up before a 16 GB download has started.
    tokenizer_path = local["tokenizer"] or source.fetch(TOKENIZER_FILE, "--tokenizer")
    mimi_path = local["mimi"] or source.fetch(MIMI_FILE, "--mimi-weight")
    if need_voices and voices_dir is None:
        voices_dir = extract_voices(source.fetch(VOICES_ARCHIVE, "--voice-prompt-dir"))
    lm_path = local["lm"] or source.fetch(LM_FILE, "--moshi-weight")

    # The file names say nothing about the architecture; only the published repo is known to fit.
    preset = DEFAULT_PRESET if hf_repo == DEFAULT_REPO and local["lm"] is None else None
    return ModelAssets(lm_path, mimi_path, tokenizer_path, voices_dir if need_voices else None, preset)


def _local_file(path: str | Path | None, flag: str) -> Path | None:
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise AssetError(f"{flag} {path}: file not found; check the path, or leave {flag} out to download the file")
    return path


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1


class _LocalFolder:
    """A folder holding the repository's files, used instead of the Hub."""

    def __init__(self, folder: Path):
        self.folder = folder

    def fetch(self, filename: str, flag: str) -> Path:
        path = self.folder / filename
        if not path.is_file():
            raise AssetError(
                f"{filename} not found in the local repo folder {self.folder}; copy it there or pass {flag}"
            )
        return path


class _Hub:
    """A Hub repo, through the Hugging Face cache."""

    def __init__(self, repo_id: str, endpoint: str | None, progress: bool):
        self.repo_id = repo_id
        self.endpoint = endpoint
        self.progress = progress

    def fetch(self, filename: str, flag: str) -> Path:
        from huggingface_hub import hf_hub_download

        options = {} if self.progress else {"tqdm_class": _silent_progress_class()}
        if self.endpoint is not None:
            options["endpoint"] = self.endpoint
        try:
            return Path(hf_hub_download(self.repo_id, filename, **options))
        except Exception as exc:
            error = _hub_error(exc, self.repo_id, filename, flag, self.endpoint)
            if error is None:
                raise
            raise error from exc


def _source_for(hf_repo: str, endpoint: str | None, progress: bool) -> _LocalFolder | _Hub:
    folder = Path(hf_repo).expanduser()
    if folder.is_dir():
        return _LocalFolder(folder)
    if _looks_like_path(hf_repo):
        raise AssetError(
            f"--hf-repo {hf_repo}: no such folder; give an existing snapshot folder or a repo id like {DEFAULT_REPO}"
        )
    return _Hub(hf_repo, endpoint, progress)


def _silent_progress_class() -> type:
    from tqdm.auto import tqdm

    class SilentProgress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # a huggingface_hub-only argument plain tqdm rejects
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentProgress


def _hub_error(exc: Exception, repo_id: str, filename: str, flag: str, endpoint: str | None) -> AssetError | None:
    """The one-line error for a huggingface_hub exception, or None for anything unexpected."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub_url = (endpoint or constants.ENDPOINT).rstrip("/")
    local_files = f"or pass local files with {LOCAL_FLAGS}"
    not_cached = f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    # When the cache cannot make up for a failed look-up, huggingface_hub raises LocalEntryNotFoundError
    # with the real failure as its cause (an HTTP answer, a refused connection, offline mode).
    failure = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None else exc
    status = _http_status(failure)
    # Subclasses before their bases: GatedRepoError is a RepositoryNotFoundError, and
    # LocalEntryNotFoundError is both an EntryNotFoundError and an OSError.
    refused = isinstance(failure, HfHubHTTPError) and status in (401, 403)
    if isinstance(failure, GatedRepoError) or (refused and not isinstance(failure, RepositoryNotFoundError)):
        if get_token() is None:
            token_hint = "and set HF_TOKEN=<a read token from https://huggingface.co/settings/tokens>"
        elif status == 401 and not isinstance(failure, GatedRepoError):
            token_hint = "and set HF_TOKEN to a valid read token (the Hub refused the one in use)"
        else:
            token_hint = "with the account of the token in use (HF_TOKEN or saved login), or use a token with access"
        gated = "; the repo is gated" if isinstance(failure, GatedRepoError) else ""
        return AssetError(
            f"no access to {repo_id} (HTTP {status or '401/403'} for {filename}{gated}): accept the licence "
            f"at {hub_url}/{repo_id} {token_hint}; {local_files}"
        )
    if isinstance(failure, RepositoryNotFoundError):
        return AssetError(
            f"repo {repo_id} not found on {hub_url} (or it is private and HF_TOKEN has no access); "
            f"check --hf-repo, {local_files}"
        )
    if isinstance(failure, RevisionNotFoundError):
        return AssetError(f"the revision of {repo_id} was not found on {hub_url}; check --hf-repo")
    offline = isinstance(exc, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE
    if isinstance(failure, OfflineModeIsEnabled) or offline:
        return AssetError(
            f"HF_HUB_OFFLINE is set and {filename} of {repo_id} must be downloaded: {not_cached}; unset "
            f"HF_HUB_OFFLINE and connect once to fill the cache, or pass {flag} (local files: {LOCAL_FLAGS})"
        )
    if isinstance(failure, EntryNotFoundError) and not isinstance(failure, LocalEntryNotFoundError):
        return AssetError(f"{filename} not found in repo {repo_id}; check --hf-repo, or pass {flag}")
    if isinstance(failure, HfHubHTTPError):
        return AssetError(
            f"{hub_url} answered HTTP {status} for {filename} of {repo_id} and {not_cached}; "
            f"try again later, {local_files}"
        )
    if isinstance(exc, LocalEntryNotFoundError):  # no answer at all: no network, proxy, firewall, DNS
        return AssetError(
            f"cannot reach {hub_url} to download {filename} of {repo_id}, and {not_cached}: connect once to fill "
            f"the cache, or pass {flag} (local files: {LOCAL_FLAGS})"
        )
    if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3"):  # e.g. a proxy error
        return AssetError(
            f"cannot reach {hub_url} to download {filename} ({type(exc).__name__}: {exc}); check the network and "
            f"HTTPS_PROXY, or pass {flag} (local files: {LOCAL_FLAGS})"
        )
    if isinstance(exc, HFValidationError):
        return AssetError(f"--hf-repo {repo_id!r} is neither a repo id like {DEFAULT_REPO} nor an existing folder")
    if isinstance(exc, OSError):  # disk full, read-only cache, ...
        return AssetError(
            f"cannot store {filename} in the Hugging Face cache ({constants.HF_HUB_CACHE}): {exc}; "
            "free space or set HF_HUB_CACHE to a writable folder"
        )
    return None


def _http_status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


# --- voices.tgz ----------------------------------------------------------------------------------


def extract_voices(archive: str | Path) -> Path:
    """Extract ``voices.tgz`` once into ``<its folder>/voices`` and return that folder.

    An existing folder is reused as it is. Members must stay inside ``voices/``: absolute names,
    ``..``, links, devices and other special files are refused with ``AssetError`` before anything
    is written. The folder only appears once complete, so an interrupted run leaves no half folder.
    """
    archive = Path(archive)
    target = archive.parent / VOICES_FOLDER
    if target.is_dir():
        return target
    try:
        # A kill -9 during extraction leaves at most this hidden folder behind, never a half voices/.
        staging = Path(tempfile.mkdtemp(prefix=".voices-", dir=archive.parent))
    except OSError as exc:
        raise AssetError(
            f"cannot extract {archive}: {archive.parent} is not writable ({exc}); pass --voice-prompt-dir"
        ) from exc
    try:
        _extract_checked(archive, staging)
        extracted = staging / VOICES_FOLDER
        if not extracted.is_dir():
            raise AssetError(
                f"{archive} has no top-level '{VOICES_FOLDER}/' folder; it is not a voices archive, "
                "pass --voice-prompt-dir"
            )
        try:
            os.rename(extracted, target)  # atomic; fails if another process finished first
        except OSError:
            if not target.is_dir():
                raise
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_checked(archive: Path, destination: Path) -> None:
    corrupt = (
        f"{archive} is corrupt or not a .tgz archive; delete {archive.resolve()} so that it is downloaded again, "
        "or pass --voice-prompt-dir"
    )
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [m for m in tar.getmembers() if _checked_member(m, archive)]
            if hasattr(tarfile, "data_filter"):
                # Second line of defence; also drops setuid bits and foreign ownership.
                tar.extractall(destination, members=members, filter="data")
            else:
                tar.extractall(destination, members=members)
    except getattr(tarfile, "FilterError", ()) as exc:
        raise AssetError(
            f"{archive} contains an unsafe member ({exc}); refusing to extract it, pass --voice-prompt-dir"
        ) from exc
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise AssetError(f"{corrupt} ({exc})") from exc
    except OSError as exc:
        raise AssetError(f"cannot extract {archive} into {destination.parent}: {exc}; pass --voice-prompt-dir") from exc


def _checked_member(member: tarfile.TarInfo, archive: Path) -> bool:
    """True for a file or folder inside ``voices/``, False for the harmless ``./`` entry; refuses
    (``AssetError``) anything that could write elsewhere or is not a plain file or folder."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts and name.strip("/") == "." and member.isdir():
        return False  # archives made with `tar -C dir .` start with "./"
    unsafe = (
        not parts
        or name.startswith(("/", "\\"))
        or (len(parts[0]) >= 2 and parts[0][1] == ":")  # a Windows drive
        or ".." in parts
        or parts[0] != VOICES_FOLDER
        or "\0" in name
    )
    if unsafe:
        raise AssetError(
            f"{archive} contains the unsafe path {name!r} (outside '{VOICES_FOLDER}/'); refusing to extract it"
        )
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "a special file"
        raise AssetError(f"{archive} contains {kind} {name!r}; refusing to extract it, pass --voice-prompt-dir instead")
    return True
