"""blockcopy's MMDetection plugin: block-sparse MMDetection detectors configured with blockcopy=dict(...)."""
try:
    import mmdet  # noqa: F401
except ImportError as error:
    raise ImportError(
        "blockcopy_mmdet needs MMDetection, and the package 'mmdet' is not installed; run "
        "tools/install_stack.sh (or install mmdet, mmengine and mmcv into this environment)") from error

from .adapter import InstanceDataAdapter, input_format  # noqa: E402
from .detector import BlockCopyDetector  # noqa: E402
from .hooks import BlockCopyHook  # noqa: E402

__all__ = ["BlockCopyDetector", "BlockCopyHook", "InstanceDataAdapter", "input_format"]
