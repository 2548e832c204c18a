"""The CUDA kernels compile and import on a machine with nvcc but no GPU (about 1 minute on 2 cores).

Skipped without nvcc, when nvcc's CUDA major version differs from torch's, and on GPU machines, where
tests/test_cuda_kernels.py builds and runs the same module.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from blockcopy_core.paths import REPO_ROOT


def _nvcc_major() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    found = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    return found.group(1) if found else None


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU present: test_cuda_kernels.py builds the kernels")
@pytest.mark.skipif(torch.version.cuda is None, reason="torch built without CUDA")
@pytest.mark.skipif(_nvcc_major() is None, reason="nvcc not found")
@pytest.mark.skipif(_nvcc_major() != (torch.version.cuda or "").split(".")[0],
                    reason="nvcc's CUDA major version differs from torch's")
def test_jit_build_compiles_and_imports(tmp_path):
    env = dict(os.environ, BLOCKCOPY_CACHE=str(tmp_path), TORCH_CUDA_ARCH_LIST="9.0",
               MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    script = ("from blockcopy_core import cuda_kernels\n"
              "m = cuda_kernels.build_jit()\n"
              "print(sorted(n for n in dir(m) if not n.startswith('_')))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "['gather_tiles', 'scatter_tiles', 'update_and_gather']" in run.stdout
