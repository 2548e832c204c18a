"""blockcopy's Detectron2 plugin: block-sparse Detectron2 models configured under cfg.MODEL.BLOCKCOPY."""
try:
    import detectron2  # noqa: F401
except ImportError as error:
    raise ImportError(
        "blockcopy_d2 needs Detectron2, and the package 'detectron2' is not installed; run "
        "tools/install_stack.sh (or install detectron2 into this environment)") from error

from . import data  # noqa: E402  (registers the video datasets)
from .centernet import BlockCopyCenterNet, CenterNetMobileNetV3, add_centernet_config  # noqa: E402
from .config import add_blockcopy_config, blockcopy_config, merge_config_file  # noqa: E402
from .modeling import (BlockCopyBackbone, BlockCopyGeneralizedRCNN, BlockCopyRetinaNet, BlockCopyRPN,  # noqa: E402
                       BlockCopySemanticSegmentor, InstancesAdapter)

__all__ = ["BlockCopyBackbone", "BlockCopyCenterNet", "BlockCopyGeneralizedRCNN", "BlockCopyRPN",
           "BlockCopyRetinaNet", "BlockCopySemanticSegmentor", "CenterNetMobileNetV3", "InstancesAdapter",
           "add_blockcopy_config", "add_centernet_config", "blockcopy_config", "data", "merge_config_file"]
