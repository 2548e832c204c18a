"""MMDetection models of the pedestrian detectors (registered in mmdet's MODELS on import)."""
from .csp import CSP
from .csp_convert import convert_pedestron_csp
from .csp_head import CSPHead
from .csp_neck import ChannelL2Norm, CSPNeck

__all__ = ["CSP", "CSPHead", "CSPNeck", "ChannelL2Norm", "convert_pedestron_csp"]
from . import legacy_box_ops, mgan, mgan_convert, vgg  # noqa: F401  (MGAN: registers its modules)
