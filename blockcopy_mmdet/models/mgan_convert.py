"""Pedestron MGAN checkpoints (MMDetection 0.6 state dicts) as state dicts of this package's ``MGAN``."""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# Pedestron's key -> ours, for the parameters whose tensors carry over unchanged.
_RENAMES = (
    (re.compile(r"backbone\.features\.\d+\.(weight|bias)"), ""),
    (re.compile(r"rpn_head\.rpn_(conv|cls|reg)\.(weight|bias)"), ""),
    (re.compile(r"mgan_head\.(convs\.\d+\.conv|conv_logits)\.(weight|bias)"), "roi_head."),
    (re.compile(r"bbox_head\.shared_fcs\.\d+\.(weight|bias)"), "roi_head."),
)
_CLASSIFIER = re.compile(r"bbox_head\.fc_cls\.(weight|bias)")
_REGRESSOR = re.compile(r"bbox_head\.fc_reg\.(weight|bias)")


def convert_pedestron_mgan(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a Pedestron MGAN state dict onto the keys of ``configs/_base_/models/mgan_vgg16.py``'s model.

    * ``backbone.features.<i>.*`` and ``rpn_head.rpn_{conv,cls,reg}.*`` keep their names;
    * ``mgan_head.*`` and ``bbox_head.shared_fcs.*`` move under ``roi_head.``;
    * ``bbox_head.fc_cls.*``: Pedestron's rows are (background, person), MMDetection 3's (person,
      background), so the two rows swap (softmax scores are unchanged by the order);
    * ``bbox_head.fc_reg.*``: a class-specific regressor has 8 rows (background deltas, person deltas);
      MMDetection 3's class-specific regressor has no background rows, so the person rows are kept. A
      class-agnostic regressor (4 rows) carries over.

    Args:
        state_dict: Pedestron's ``checkpoint['state_dict']`` (names -> tensors).

    Returns:
        ``(converted, unmapped)``: the state dict for ``model.load_state_dict`` and the input keys that
        are no MGAN parameter (left out of ``converted``), in input order.

    Raises:
        TypeError: a value is not a tensor (e.g. a whole checkpoint was passed).
        ValueError: the classifier or regressor does not have Pedestron's one-class shape.
    """
    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; pass the "
                            f"checkpoint's 'state_dict'")
        target = "roi_head." + key
        if _CLASSIFIER.fullmatch(key):
            _expect_rows(key, value, (2,), "(background, person)")
            converted[target] = value[[1, 0]].clone()
        elif _REGRESSOR.fullmatch(key):
            _expect_rows(key, value, (4, 8), "4 class-agnostic or 8 class-specific (background, person)")
            converted[target] = value[-4:].clone()
        else:
            prefix = next((prefix for pattern, prefix in _RENAMES if pattern.fullmatch(key)), None)
            if prefix is None:
                unmapped.append(key)
            else:
                converted[prefix + key] = value
    return converted, unmapped


def _expect_rows(key: str, value: torch.Tensor, rows: tuple[int, ...], meaning: str) -> None:
    if value.size(0) not in rows:
        raise ValueError(f"{key} has {value.size(0)} output rows, expected {meaning} for Pedestron's "
                         f"one-class MGAN (shape {tuple(value.shape)})")
