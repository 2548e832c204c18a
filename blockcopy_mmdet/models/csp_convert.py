"""Pedestron (MMDetection 1.x) CSP checkpoints -> the state_dict keys of :class:`~.csp.CSP`."""
from __future__ import annotations

import re
from collections.abc import Mapping

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# MMDetection 1.x's ResNet names its modules as MMDetection 3's does: backbone keys carry over unchanged.
_BACKBONE = re.compile(rf"backbone\.(conv1\.weight|bn1\.{_BN}"
                       rf"|layer\d+\.\d+\.(conv[123]\.weight|bn[123]\.{_BN}|downsample\.0\.weight|downsample\.1\.{_BN}))")
_NECK_LEVELS = {"p3": 0, "p4": 1, "p5": 2}
_HEAD_BRANCHES = {"cls_convs": "center_convs", "reg_convs": "scale_convs", "offset_convs": "offset_convs"}
_HEAD_PREDICTORS = {"csp_cls": "center_predictor", "csp_reg": "scale_predictor", "csp_offset": "offset_predictor"}
_HEAD_SCALES = {"reg_scales": "scale_multipliers", "offset_scales": "offset_multipliers"}


def _convert_key(key: str) -> str | None:
    """The CSP key of a Pedestron key, or None when the key is not one of Pedestron CSP's."""
    if _BACKBONE.fullmatch(key):
        return key
    if m := re.fullmatch(r"neck\.(p[345])\.(weight|bias)", key):
        return f"neck.deconvs.{_NECK_LEVELS[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"neck\.(p[345])_l2\.weight", key):
        return f"neck.l2_norms.{_NECK_LEVELS[m[1]]}.weight"
    if m := re.fullmatch(r"bbox_head\.(cls_convs|reg_convs|offset_convs)\.(\d+)\.(conv\.weight|gn\.weight|gn\.bias)",
                         key):
        return f"bbox_head.{_HEAD_BRANCHES[m[1]]}.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"bbox_head\.(csp_cls|csp_reg|csp_offset)\.(weight|bias)", key):
        return f"bbox_head.{_HEAD_PREDICTORS[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"bbox_head\.(reg_scales|offset_scales)\.(\d+)\.scale", key):
        return f"bbox_head.{_HEAD_SCALES[m[1]]}.{m[2]}.scale"
    return None


def convert_pedestron_csp(state_dict: Mapping) -> tuple[dict, list[str]]:
    """Map a Pedestron CSP state dict (keys ``backbone.``, ``neck.``, ``bbox_head.``) onto :class:`~.csp.CSP`.

    Pedestron's neck levels ``p3``, ``p4``, ``p5`` (transposed convs) and ``p3_l2``... (their L2Norm
    scales) become ``neck.deconvs.{0,1,2}`` and ``neck.l2_norms.{0,1,2}``; the head's ``cls_convs``,
    ``reg_convs``, ``offset_convs`` become ``center_convs``, ``scale_convs``, ``offset_convs`` (each a
    ConvModule with ``conv`` and ``gn``), ``csp_cls``/``csp_reg``/``csp_offset`` the predictors
    ``center_predictor``/``scale_predictor``/``offset_predictor``, and the Scale modules
    ``reg_scales``/``offset_scales``
    become ``scale_multipliers``/``offset_multipliers``. ResNet keys are unchanged.

    Returns the converted dict (same tensors) and the keys it did not know, in their order (they are not
    in the converted dict).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"convert_pedestron_csp expects a state dict (a mapping of names to tensors), got "
                        f"{type(state_dict).__name__}")
    converted, unmapped = {}, []
    for key, value in state_dict.items():
        new_key = _convert_key(key)
        if new_key is None:
            unmapped.append(key)
        else:
            converted[new_key] = value
    return converted, unmapped
