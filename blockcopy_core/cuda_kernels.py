"""Build and load blockcopy's CUDA tile kernels (``kernels/tiles.cu``, ``kernels/bindings.cpp``).

The module is ``blockcopy_core._C`` when ``setup.py`` built it ahead of time; otherwise it is compiled
just in time on first use with ``torch.utils.cpp_extension.load`` (ninja, nvcc), into
``<cache_dir()>/torch_extensions/<key>`` where the key hashes the sources, the torch, CUDA and Python
versions and the target GPU architectures, so later processes reuse the build.

``BLOCKCOPY_DISABLE_CUDA_KERNELS=1`` makes :func:`available` false: :mod:`blockcopy_core.tiles` then
runs its pure-PyTorch reference on CUDA tensors too.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .errors import BlockCopyError
from .paths import REPO_ROOT, cache_dir

KERNEL_DIR = REPO_ROOT / "kernels"
SOURCES = ("bindings.cpp", "tiles.cu")
HEADERS = ("tiles.h",)

_module: ModuleType | None = None
_error: "CudaKernelBuildError | None" = None
_warned = False


class CudaKernelBuildError(BlockCopyError):
    """The CUDA kernels could not be imported or compiled."""


def disabled() -> bool:
    """True when ``BLOCKCOPY_DISABLE_CUDA_KERNELS`` is set to anything but ``""`` or ``"0"``."""
    return os.environ.get("BLOCKCOPY_DISABLE_CUDA_KERNELS", "") not in ("", "0")


def load() -> ModuleType:
    """The kernel module (``_C``, else a JIT build); raises :class:`CudaKernelBuildError`, once cached."""
    global _module, _error
    if _module is None:
        if _error is not None:
            raise _error
        try:
            _module = _import_or_build()
        except CudaKernelBuildError as error:
            _error = error
            raise
    return _module


def available() -> bool:
    """True when the kernels can run here: a CUDA device, not disabled, and the module loads.

    A failed build is reported once as a warning holding the compiler output's tail.
    """
    global _warned
    if disabled() or not torch.cuda.is_available():
        return False
    try:
        load()
    except CudaKernelBuildError as error:
        if not _warned:
            _warned = True
            warnings.warn(f"{error}\nFalling back to the PyTorch tile path.", RuntimeWarning, stacklevel=2)
        return False
    return True


def build_key() -> str:
    """Hash of what the compiled module depends on: sources, torch/CUDA/Python versions, GPU archs."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((KERNEL_DIR / name).read_bytes())
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or ",".join(
        sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}|{archs}".encode())
    return digest.hexdigest()[:16]


def build_jit() -> ModuleType:
    """Compile (or reuse the cached build of) the sources with ninja and nvcc, and import the result.

    Needs no GPU: without one, name the target with ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``).
    """
    missing = [name for name in SOURCES + HEADERS if not (KERNEL_DIR / name).is_file()]
    if missing:
        raise CudaKernelBuildError(f"CUDA kernel sources {missing} not found in {KERNEL_DIR}, and no "
                                   "prebuilt blockcopy_core._C; reinstall from a source checkout")
    from torch.utils import cpp_extension

    _locate_cuda_toolkit(cpp_extension)
    if cpp_extension.CUDA_HOME is None:
        raise CudaKernelBuildError("cannot build blockcopy's CUDA kernels: nvcc not found (set CUDA_HOME "
                                   f"to the CUDA toolkit matching torch's CUDA {torch.version.cuda})")
    key = build_key()
    build_dir = cache_dir() / "torch_extensions" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=f"blockcopy_tiles_{key}", sources=[str(KERNEL_DIR / name) for name in SOURCES],
            build_directory=str(build_dir), extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as error:  # compiler, linker or import failure: all end the same way
        tail = "\n".join(str(error).strip().splitlines()[-40:])
        raise CudaKernelBuildError(
            f"building blockcopy's CUDA kernels in {build_dir} failed ({type(error).__name__}); set "
            f"BLOCKCOPY_DISABLE_CUDA_KERNELS=1 to use the PyTorch path. Output (tail):\n{tail}") from error


def _import_or_build() -> ModuleType:
    try:
        from . import _C  # built by setup.py
        return _C
    except ImportError:
        return build_jit()


def _locate_cuda_toolkit(cpp_extension: ModuleType) -> None:
    """Point torch at the toolkit nvcc runs from when its guess (nvcc's grandparent folder, wrong for a
    wrapper script such as /usr/local/bin/nvcc) holds no CUDA headers and CUDA_HOME is unset."""
    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    command = [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]
    dryrun = subprocess.run(command, capture_output=True, text=True).stderr
    top = next((line.split("=", 1)[1] for line in dryrun.splitlines() if line.startswith("#$ TOP=")), None)
    if top and (Path(top) / "include" / "cuda_runtime.h").is_file():
        cpp_extension.CUDA_HOME = str(Path(top).resolve())
