"""The BlockCopy backbone: any registered Detectron2 backbone, run block-sparse."""
from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from blockcopy_core.config import BlockCopyConfig, input_divisibility
from blockcopy_core.engine import BlockSparseModel
from blockcopy_core.errors import ConfigError

from ..config import blockcopy_config


class BlockCopyBackbone(BlockSparseModel, Backbone):
    """A Detectron2 backbone converted in place for block-sparse execution.

    It is the wrapped backbone's module tree (same parameter and buffer names, so model-zoo checkpoints
    load unchanged) and a Detectron2 ``Backbone``: ``output_shape()`` and ``padding_constraints`` are the
    wrapped backbone's, ``size_divisibility`` is raised to a multiple of the block size. Called by a
    BlockCopy meta-architecture with the frame's grid bound (:meth:`BlockSparseModel.bind`), it returns
    the wrapped backbone's feature dict, blocks not executed holding their last values.
    """

    def __init__(self, backbone: Backbone, config: BlockCopyConfig):
        strides = [shape.stride for shape in backbone.output_shape().values()]
        if strides and config.block_size % max(strides):
            raise ConfigError("MODEL.BLOCKCOPY.BLOCK_SIZE", config.block_size,
                              f"a multiple of the backbone's largest stride {max(strides)} (its output strides: "
                              f"{sorted(set(strides))})")
        super().__init__(backbone.eval(), config.block_size, **config.engine_options())

    def output_shape(self) -> dict[str, ShapeSpec]:
        return self.model.output_shape()

    @property
    def padding_constraints(self) -> dict[str, int]:
        constraints = dict(self.model.padding_constraints)
        if "size_divisibility" in constraints:  # it overrides size_divisibility in ImageList.from_tensors
            constraints["size_divisibility"] = input_divisibility(self.block_size, constraints["size_divisibility"])
        return constraints


@BACKBONE_REGISTRY.register()
def build_blockcopy_backbone(cfg, input_shape: ShapeSpec) -> BlockCopyBackbone:
    """The backbone ``cfg.MODEL.BLOCKCOPY.BACKBONE`` names (default ResNet-FPN), made block-sparse with
    ``cfg.MODEL.BLOCKCOPY``'s block size, buckets, CUDA graphs and dense-when-full."""
    name = cfg.MODEL.BLOCKCOPY.BACKBONE
    if name == "build_blockcopy_backbone":
        raise ValueError("MODEL.BLOCKCOPY.BACKBONE names the backbone to wrap (e.g. build_resnet_fpn_backbone), "
                         "not build_blockcopy_backbone itself")
    backbone = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    return BlockCopyBackbone(backbone, blockcopy_config(cfg))
