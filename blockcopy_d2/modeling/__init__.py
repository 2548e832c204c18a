"""Detectron2 modules registered by ``import blockcopy_d2``: the BlockCopy backbone, RPN and
meta-architectures."""
from .adapters import InstancesAdapter, input_format
from .backbone import BlockCopyBackbone, build_blockcopy_backbone
from .meta_arch import BlockCopyGeneralizedRCNN, BlockCopyMetaArch, BlockCopyRetinaNet, BlockCopySemanticSegmentor
from .rpn import BlockCopyRPN

__all__ = ["BlockCopyBackbone", "BlockCopyGeneralizedRCNN", "BlockCopyMetaArch", "BlockCopyRPN", "BlockCopyRetinaNet",
           "BlockCopySemanticSegmentor", "InstancesAdapter", "build_blockcopy_backbone", "input_format"]
