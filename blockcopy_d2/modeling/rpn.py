"""The BlockCopy RPN: Detectron2's RPN whose head runs block-sparse."""
from __future__ import annotations

from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator import RPN

from blockcopy_core.engine import convert

from ..config import blockcopy_config


@PROPOSAL_GENERATOR_REGISTRY.register()
class BlockCopyRPN(RPN):
    """Detectron2's RPN with its head (3x3 conv, objectness and anchor-delta convs) converted in place:
    on each frame the head runs on the blocks the backbone ran (a BlockCopy meta-architecture binds it
    to the backbone), objectness and deltas of the other blocks are copied from their last execution;
    anchors and proposal selection are Detectron2's own. Parameter names are unchanged."""

    def __init__(self, cfg, input_shape):
        super().__init__(cfg, input_shape)
        self.rpn_head = convert(self.rpn_head.eval(), config=blockcopy_config(cfg))
