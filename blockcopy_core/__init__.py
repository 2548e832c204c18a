"""blockcopy_core: block-sparse execution of pretrained CNNs on video (needs only PyTorch)."""
import importlib

from .config import BlockCopyConfig, input_divisibility
from .engine import BlockSparseModel, FrameStats, convert
from .errors import (BlockCopyError, ConfigError, ControlFlowChangedError, InvalidInputError, ProtocolError,
                     UnsupportedOperationError)
from .grid import FrameGeometry, TileIndex
from .macs import count_macs
from .ops import register_op, supported_ops
from .version import __version__

# The high-level API needs torchvision (box IoU in the information gain): imported on first use, so that
# `import blockcopy_core` needs only torch.
_LAZY = {"BlockCopy": "blockcopy", "StepResult": "blockcopy", "task_parameters": "blockcopy",
         "CenterNetAdapter": "adapters", "DetectionAdapter": "adapters", "InputFormat": "adapters",
         "OutputAdapter": "adapters", "SemanticSegmentationAdapter": "adapters", "register_policy": "policy"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'blockcopy_core' has no attribute {name!r}")


__all__ = [
    *_LAZY, "BlockCopyConfig", "BlockCopyError", "BlockSparseModel", "ConfigError", "ControlFlowChangedError",
    "FrameGeometry", "FrameStats", "InvalidInputError", "ProtocolError", "TileIndex", "UnsupportedOperationError",
    "convert", "count_macs", "input_divisibility",
    "register_op", "supported_ops", "__version__",
]
