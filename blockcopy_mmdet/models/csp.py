"""The CSP pedestrian detector (Pedestron's ``CSP``) for inference: ResNet backbone, :class:`CSPNeck`,
:class:`CSPHead`, driven by MMDetection's single-stage detector."""
from __future__ import annotations

from mmdet.models.detectors import SingleStageDetector
from mmdet.registry import MODELS


@MODELS.register_module()
class CSP(SingleStageDetector):
    """A :class:`~mmdet.models.detectors.SingleStageDetector` for CSP's neck and head; inference only
    (``predict`` and ``_forward`` as in MMDetection)."""

    def loss(self, batch_inputs, batch_data_samples) -> dict:
        raise NotImplementedError("CSP runs inference only: its training losses (center focal loss, height "
                                  "and offset regression) are not implemented; train with Pedestron and "
                                  "convert the checkpoint with convert_pedestron_csp")
