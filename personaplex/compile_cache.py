"""A compile cache that outlives the process: the second start of a server skips most compilation.

Inductor (torch.compile) and Triton keep what they compiled in directories; by default those are under
/tmp (lost on reboot, absent from a fresh container). This points both at the user's cache directory
(``$XDG_CACHE_HOME/personaplex/compile``, ``~/.cache`` by default; a Docker volume mounted there keeps it
across containers) unless the caller already set them. ``PERSONAPLEX_COMPILE_CACHE`` names another
directory, or ``off`` to leave the defaults alone. A cold start never depends on it.
"""

from __future__ import annotations

import os
from pathlib import Path


def compile_cache_dir() -> Path | None:
    """Where compiled kernels are kept (None: ``PERSONAPLEX_COMPILE_CACHE=off``)."""
    chosen = os.environ.get("PERSONAPLEX_COMPILE_CACHE", "").strip()
    if chosen.lower() in ("off", "0", "none"):
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "personaplex" / "compile"


def use_persistent_compile_cache() -> Path | None:
    """Point Inductor's and Triton's caches into ``compile_cache_dir`` (unless already set); call before
    the first compilation. Returns the directory used, or None."""
    root = compile_cache_dir()
    if root is None:
        return None
    for variable, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        if not os.environ.get(variable):
            path = root / sub
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError:  # a read-only home: keep the defaults
                return None
            os.environ[variable] = str(path)
    return root
