"""blockcopy's Detectron2 plugin: block-sparse Detectron2 models configured under cfg.MODEL.BLOCKCOPY."""
try:
    import detectron2  # noqa: F401
except ImportError as error:
    raise ImportError(
        "blockcopy_d2 needs Detectron2, and the package 'detectron2' is not installed; run "
        "tools/install_stack.sh (or install detectron2 into this environment)") from error

from .config import add_blockcopy_config, blockcopy_config  # noqa: E402
from .modeling import (BlockCopyBackbone, BlockCopyGeneralizedRCNN, BlockCopyRetinaNet, BlockCopyRPN,  # noqa: E402
                       BlockCopySemanticSegmentor, InstancesAdapter)

__all__ = ["BlockCopyBackbone", "BlockCopyGeneralizedRCNN", "BlockCopyRPN", "BlockCopyRetinaNet",
           "BlockCopySemanticSegmentor", "InstancesAdapter", "add_blockcopy_config", "blockcopy_config"]
