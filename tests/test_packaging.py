"""What importing the packages needs, and the errors when a framework is missing."""
from __future__ import annotations

import subprocess
import sys

import pytest


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_core_imports_with_torch_only():
    result = python(
        "import sys\n"
        "for name in ('torchvision', 'cv2', 'detectron2', 'mmdet', 'mmcv', 'mmengine'):\n"
        "    sys.modules[name] = None  # importing any of them now fails\n"
        "import blockcopy_core\n"
        "print(blockcopy_core.convert)")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("plugin, framework", [("blockcopy_d2", "detectron2"), ("blockcopy_mmdet", "mmdet")])
def test_plugin_names_its_missing_framework(plugin, framework):
    result = python(f"import sys; sys.modules[{framework!r}] = None; import {plugin}")
    assert result.returncode != 0
    assert f"ImportError: {plugin} needs" in result.stderr and f"'{framework}' is not installed" in result.stderr
