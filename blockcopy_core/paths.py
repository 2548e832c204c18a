"""Where blockcopy finds the shared data and models, and where it caches downloads."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The project's shared data folder: ``$BLOCKCOPY_SHARED``, else ``<repo>/../shared``."""
    return Path(os.environ.get("BLOCKCOPY_SHARED", REPO_ROOT.parent / "shared"))


def cache_dir() -> Path:
    """A per-user cache for fetched files: ``$BLOCKCOPY_CACHE``, else ``~/.cache/blockcopy``."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blockcopy"
    path = Path(os.environ.get("BLOCKCOPY_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path
