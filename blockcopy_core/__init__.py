"""blockcopy_core: block-sparse execution of pretrained CNNs on video (needs only PyTorch)."""
from .engine import BlockSparseModel, FrameStats, convert
from .errors import BlockCopyError, ControlFlowChangedError, InvalidInputError, UnsupportedOperationError
from .grid import FrameGeometry, TileIndex
from .macs import count_macs
from .ops import supported_ops
from .version import __version__

__all__ = [
    "BlockCopyError", "BlockSparseModel", "ControlFlowChangedError", "FrameGeometry", "FrameStats",
    "InvalidInputError", "TileIndex", "UnsupportedOperationError", "convert", "count_macs",
    "supported_ops", "__version__",
]
