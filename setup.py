"""blockcopy: block-sparse video inference for pretrained CNNs (BlockCopy, ICCV 2021).

With a CUDA device (or FORCE_CUDA=1) and the CUDA toolkit (CUDA_HOME), the tile kernels in kernels/
are built ahead of time as ``blockcopy_core._C``; otherwise the install is pure Python and the kernels
are compiled just in time on first use on a GPU machine (blockcopy_core/cuda_kernels.py). Build with
``pip install --no-build-isolation`` so the extension is compiled against the installed torch.
"""
import os

from setuptools import find_packages, setup


def cuda_extension() -> dict:
    """setup() arguments that build ``blockcopy_core._C``, or none when CUDA cannot be built here."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # torch not importable in an isolated build environment: pure Python
        return {}
    wanted = torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
    if not wanted or CUDA_HOME is None:
        return {}
    extension = CUDAExtension(
        "blockcopy_core._C", ["kernels/bindings.cpp", "kernels/tiles.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="blockcopy",
    version="0.1.0",
    description="Run pretrained CNNs block-sparse on video: execute only the blocks that matter.",
    packages=find_packages(include=["blockcopy_core*", "blockcopy_d2*", "blockcopy_mmdet*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"tools": ["tqdm", "opencv-python-headless", "matplotlib"]},
    **cuda_extension(),
)
