"""Build and load blockcopy's CPU tile kernels (``kernels/cpu_tiles.cpp``).

Compiled just in time on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja,
no CUDA) into ``<cache_dir()>/torch_extensions/cpu-<key>``, the key hashing the source and the torch and
Python versions, so later processes reuse the build. Without a compiler, or with
``BLOCKCOPY_DISABLE_CPU_KERNELS=1``, :mod:`blockcopy_core.tiles` keeps its per-tile PyTorch copies (a
failed build is reported once as a warning).
"""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from types import ModuleType

import torch

from .cuda_kernels import KERNEL_DIR
from .paths import cache_dir

SOURCE = "cpu_tiles.cpp"

_module: ModuleType | None = None
_failed = False


def disabled() -> bool:
    """True when ``BLOCKCOPY_DISABLE_CPU_KERNELS`` is set to anything but ``""`` or ``"0"``."""
    return os.environ.get("BLOCKCOPY_DISABLE_CPU_KERNELS", "") not in ("", "0")


def load() -> ModuleType | None:
    """The kernel module, built on first use; None when disabled or when the build failed."""
    global _module, _failed
    if disabled():
        return None
    if _module is None and not _failed:
        try:
            _module = _build()
        except Exception as error:  # compiler, linker or import failure: all end the same way
            _failed = True
            tail = "\n".join(str(error).strip().splitlines()[-20:])
            warnings.warn(f"building blockcopy's CPU tile kernels failed ({type(error).__name__}); the tile "
                          f"moves use per-tile PyTorch copies. Output (tail):\n{tail}", RuntimeWarning, stacklevel=2)
    return _module


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    source = KERNEL_DIR / SOURCE
    digest = hashlib.sha256(source.read_bytes())
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}".encode())
    key = digest.hexdigest()[:16]
    build_dir = cache_dir() / "torch_extensions" / f"cpu-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=f"blockcopy_cpu_tiles_{key}", sources=[str(source)], build_directory=str(build_dir),
                              extra_cflags=["-O3"], verbose=False)
