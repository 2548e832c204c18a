"""blockcopy's MMDetection plugin: block-sparse MMDetection detectors configured with blockcopy=dict(...)."""
try:
    import mmdet  # noqa: F401
except ImportError as error:
    raise ImportError(
        "blockcopy_mmdet needs MMDetection, and the package 'mmdet' is not installed; run "
        "tools/install_stack.sh (or install mmdet, mmengine and mmcv into this environment)") from error

from . import models  # noqa: E402  (registers CSP, MGAN and their parts)
from .adapter import InstanceDataAdapter, input_format  # noqa: E402
from .datasets import ClipBatchSampler, ClipSampler, CityPersonsVideoDataset  # noqa: E402
from .detector import BlockCopyDetector, predict_from_trunk, trunk_of  # noqa: E402
from .evaluation import CityPersonsMetric  # noqa: E402
from .hooks import BlockCopyHook  # noqa: E402

__all__ = ["BlockCopyDetector", "BlockCopyHook", "CityPersonsMetric", "CityPersonsVideoDataset", "ClipBatchSampler",
           "ClipSampler", "InstanceDataAdapter", "input_format", "models", "predict_from_trunk", "trunk_of"]
