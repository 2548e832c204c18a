"""blockcopy_core: block-sparse execution of pretrained CNNs on video (needs only PyTorch)."""
import importlib

from .engine import BlockSparseModel, FrameStats, convert
from .errors import BlockCopyError, ControlFlowChangedError, InvalidInputError, UnsupportedOperationError
from .grid import FrameGeometry, TileIndex
from .macs import count_macs
from .ops import supported_ops
from .version import __version__

# The high-level API needs torchvision (box IoU in the information gain): imported on first use, so that
# `import blockcopy_core` needs only torch.
_LAZY = {"BlockCopy": "blockcopy", "CenterNetAdapter": "adapters", "DetectionAdapter": "adapters",
         "OutputAdapter": "adapters", "SemanticSegmentationAdapter": "adapters"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'blockcopy_core' has no attribute {name!r}")


__all__ = [
    *_LAZY, "BlockCopyError", "BlockSparseModel", "ControlFlowChangedError", "FrameGeometry", "FrameStats",
    "InvalidInputError", "TileIndex", "UnsupportedOperationError", "convert", "count_macs",
    "supported_ops", "__version__",
]
