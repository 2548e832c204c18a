"""BlockCopy meta-architectures: Detectron2's R-CNN, RetinaNet and semantic FPN run block-sparse, the
blocks chosen per frame by BlockCopy's online policy.

Each owns the clip state: before the backbone it asks the policy for the frame's grid
(:meth:`blockcopy_core.BlockCopy.select`) and binds it to the block-sparse backbone; the block-sparse
heads (RPN, RetinaNet head, semantic head) follow the backbone's executed grid; ROI heads run densely on
the dense features; after post-processing it feeds the result back (:meth:`BlockCopy.observe`). A new
clip starts whenever the inputs' ``clip_id`` changes (inputs without one are each a clip of their own).
Inference only: train the plain model and load its checkpoint, which loads unchanged.
"""
from __future__ import annotations

import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from blockcopy_core.adapters import OutputAdapter, SemanticSegmentationAdapter
from blockcopy_core.blockcopy import BlockCopy
from blockcopy_core.clips import VideoModel
from blockcopy_core.engine import BlockSparseModel, convert

from ..config import blockcopy_config
from ..inputs import clip_ids_of, is_annotated
from .adapters import InstancesAdapter, input_format
from .backbone import BlockCopyBackbone


class BlockCopyMetaArch(VideoModel):
    """What the BlockCopy meta-architectures share; mixed in before a Detectron2 meta-architecture.

    ``self.blockcopy`` (a :class:`BlockCopy`: the policy, its optimiser and the statistics) is not a
    child module (:class:`VideoModel`), so the model's ``state_dict`` is the plain model's. Save it with
    ``self.blockcopy.state_dict()``; ``MODEL.BLOCKCOPY.POLICY_WEIGHTS`` loads one
    (:func:`blockcopy_d2.engine.load_weights`).
    """

    def _init_blockcopy(self, cfg, adapter: OutputAdapter) -> None:
        if not isinstance(self.backbone, BlockCopyBackbone):
            raise ValueError(f"{type(self).__name__} needs MODEL.BACKBONE.NAME: build_blockcopy_backbone (the "
                             "backbone to wrap goes in MODEL.BLOCKCOPY.BACKBONE), got "
                             f"{cfg.MODEL.BACKBONE.NAME!r}")
        config = blockcopy_config(cfg)
        self._set_blockcopy(BlockCopy(self.backbone, adapter, config))
        object.__setattr__(self, "_followers", [m for m in self.modules()
                                                if isinstance(m, BlockSparseModel) and m is not self.backbone])
        for head in self._followers:
            head.bind(self.backbone)
        self._init_video()
        self._inputs: list[dict] = []
        self._image_sizes: list | None = None
        self.eval()

    @property
    def runner(self) -> BlockCopy:
        return self.blockcopy

    def reset(self) -> None:
        super().reset()
        for head in self._followers:
            head.reset()

    def train(self, mode: bool = True):
        if mode:
            raise NotImplementedError(f"{type(self).__name__} runs inference only: train the plain Detectron2 "
                                      "model and load its checkpoint (it loads unchanged)")
        return super().train(False)

    def _select(self, batched_inputs: list[dict], images: ImageList) -> None:
        """Start a new clip if the inputs say so, choose the frame's blocks and bind them to the backbone."""
        self._start_time_step(clip_ids_of(batched_inputs))
        self._inputs, self._image_sizes = batched_inputs, images.image_sizes
        self.backbone.bind(self.blockcopy.select(images.tensor))

    def _observe(self, result) -> None:
        self._count(self.blockcopy.observe(result), is_annotated(self._inputs))


@META_ARCH_REGISTRY.register()
class BlockCopyGeneralizedRCNN(BlockCopyMetaArch, GeneralizedRCNN):
    """Mask R-CNN / Faster R-CNN with a block-sparse backbone and RPN head (``BlockCopyRPN``), dense ROI
    heads; information gain by mask IoU when ``MODEL.MASK_ON``, else box IoU."""

    def __init__(self, cfg):
        super().__init__(cfg)
        adapter = InstancesAdapter(cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.BLOCKCOPY.IG_SCORE_THRESHOLD,
                                   input_format(cfg), use_masks=cfg.MODEL.MASK_ON,
                                   max_detections=cfg.TEST.DETECTIONS_PER_IMAGE)
        self._init_blockcopy(cfg, adapter)

    def preprocess_image(self, batched_inputs):
        images = super().preprocess_image(batched_inputs)
        self._select(batched_inputs, images)
        return images

    def inference(self, batched_inputs, detected_instances=None, do_postprocess: bool = True):
        results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        self._observe(results)
        if do_postprocess:
            return GeneralizedRCNN._postprocess(results, batched_inputs, self._image_sizes)
        return results


@META_ARCH_REGISTRY.register()
class BlockCopyRetinaNet(BlockCopyMetaArch, RetinaNet):
    """RetinaNet with every convolution block-sparse: backbone, FPN and the classification and box
    subnets; information gain by box IoU."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = convert(self.head.eval(), config=blockcopy_config(cfg))
        adapter = InstancesAdapter(cfg.MODEL.RETINANET.NUM_CLASSES, cfg.MODEL.BLOCKCOPY.IG_SCORE_THRESHOLD,
                                   input_format(cfg), max_detections=cfg.TEST.DETECTIONS_PER_IMAGE)
        self._init_blockcopy(cfg, adapter)

    def preprocess_image(self, batched_inputs):
        images = super().preprocess_image(batched_inputs)
        self._select(batched_inputs, images)
        return images

    def forward_inference(self, images, features, predictions):
        results = super().forward_inference(images, features, predictions)
        self._observe(results)
        return results


@META_ARCH_REGISTRY.register()
class BlockCopySemanticSegmentor(BlockCopyMetaArch, SemanticSegmentor):
    """Semantic FPN with the backbone and the semantic head (GroupNorm, statistics from its dense state)
    block-sparse; information gain is the pixelwise KL divergence of the class distributions."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sem_seg_head = convert(self.sem_seg_head.eval(), config=blockcopy_config(cfg))
        adapter = SemanticSegmentationAdapter(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, from_logits=False,
                                              input_format=input_format(cfg))
        self._init_blockcopy(cfg, adapter)

    def forward(self, batched_inputs):
        if self.training:
            raise NotImplementedError(f"{type(self).__name__} runs inference only")
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility,
                                        padding_constraints=self.backbone.padding_constraints)
        self._select(batched_inputs, images)
        logits, _ = self.sem_seg_head(self.backbone(images.tensor), None)
        self._observe(F.softmax(logits.float(), dim=1))
        processed = []
        for result, inputs, size in zip(logits, batched_inputs, images.image_sizes):
            height, width = inputs.get("height", size[0]), inputs.get("width", size[1])
            processed.append({"sem_seg": sem_seg_postprocess(result, size, height, width)})
        return processed
