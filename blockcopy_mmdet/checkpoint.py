"""Checkpoints: Pedestron's (MMDetection 1.x) CSP and MGAN files converted to this package's modules, and
the check that a checkpoint fits the model it is loaded into.

mmengine loads checkpoints non-strictly (missing and unexpected keys are only logged), so a checkpoint of
another architecture would run as a half-random network; :func:`check_checkpoint` turns that into an
error naming the keys, and recognises an unconverted Pedestron file.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from mmengine.config import Config

from .models import convert_pedestron_csp
from .models.mgan_convert import convert_pedestron_mgan

__all__ = ["PEDESTRON_ARCHITECTURES", "CheckpointMismatchError", "check_checkpoint", "convert_pedestron_checkpoint",
           "detect_pedestron_architecture", "read_state_dict"]

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "_base_" / "models"

PEDESTRON_ARCHITECTURES: dict[str, tuple[Callable, Path]] = {
    "csp": (convert_pedestron_csp, CONFIGS / "csp_r50.py"),
    "mgan": (convert_pedestron_mgan, CONFIGS / "mgan_vgg16.py"),
}
"""Architecture name -> (key converter, the model config whose keys a converted checkpoint must fill)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model."""


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file: its ``state_dict`` entry (MMDetection checkpoints, Pedestron's
    mean-teacher ``.stu`` files) or the file itself when it is one; a DDP ``module.`` prefix is dropped.

    Files are read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects;
    ``trust_pickle`` reads a file you trust that holds other objects (old checkpoints' metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds Python objects besides tensors; if you trust the file, read it with "
                         f"trust_pickle (--trust-pickle): {error}") from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} is not a checkpoint (a dict with a 'state_dict'), got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} has no state dict of tensors (top-level keys: {sorted(checkpoint)[:8]})")
    return {key.removeprefix("module."): value for key, value in state.items()}


def detect_pedestron_architecture(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"csp"`` or ``"mgan"`` from a Pedestron state dict's keys."""
    keys = list(state_dict)
    if any(key.startswith("mgan_head.") for key in keys):
        return "mgan"
    if any(key.startswith(("bbox_head.csp_cls", "neck.p3")) for key in keys):
        return "csp"
    raise ValueError(f"not a Pedestron CSP or MGAN checkpoint (no 'neck.p3*' / 'bbox_head.csp_cls*' or "
                     f"'mgan_head.*' keys; first keys: {keys[:5]})")


def _model_state(config: Path | str) -> dict[str, torch.Tensor]:
    """The state dict (names and shapes) of the model a config file defines."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    model_cfg = Config.fromfile(str(config)).model
    if model_cfg.get("type") == "BlockCopyDetector":
        model_cfg = model_cfg.detector
    return MODELS.build(model_cfg).state_dict()


def _mismatches(checkpoint: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Lines naming the missing, unexpected and wrongly shaped keys of ``checkpoint`` against ``expected``."""
    lines = [f"missing: {key}" for key in expected if key not in checkpoint]
    lines += [f"unexpected: {key}" for key in checkpoint if key not in expected]
    lines += [f"shape of {key}: checkpoint {tuple(checkpoint[key].shape)}, model {tuple(expected[key].shape)}"
              for key in checkpoint if key in expected and checkpoint[key].shape != expected[key].shape]
    return lines


def convert_pedestron_checkpoint(source: str | Path, destination: str | Path, architecture: str | None = None,
                                 allow_missing: bool = False, trust_pickle: bool = False) -> dict[str, list[str]]:
    """Convert a Pedestron CSP or MGAN checkpoint (incl. mean-teacher ``.stu`` files) into an MMDetection 3
    checkpoint of this package's ``CSP`` / ``MGAN`` (``configs/_base_/models/``).

    Every key must map onto the model and every model parameter must be filled, with matching shapes;
    otherwise :class:`CheckpointMismatchError` lists the keys, unless ``allow_missing`` (then the
    unmapped input keys are dropped and missing parameters keep their initialisation when loaded).

    Returns:
        ``{"architecture": [name], "unmapped": [...], "missing": [...]}`` (the lists are empty for a
        complete conversion).
    """
    state = read_state_dict(source, trust_pickle)
    architecture = architecture or detect_pedestron_architecture(state)
    if architecture not in PEDESTRON_ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(PEDESTRON_ARCHITECTURES)}")
    convert, config = PEDESTRON_ARCHITECTURES[architecture]
    converted, unmapped = convert(state)
    problems = [f"unmapped Pedestron key: {key}" for key in unmapped] + _mismatches(converted, _model_state(config))
    missing = [line.removeprefix("missing: ") for line in problems if line.startswith("missing: ")]
    shapes = [line for line in problems if line.startswith("shape of ")]
    if shapes or (problems and not allow_missing):
        hint = "" if shapes else " (--allow-missing converts anyway)"
        raise CheckpointMismatchError(f"{source} does not convert completely into {architecture.upper()}{hint}:\n  "
                                      + "\n  ".join(problems))
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": converted, "meta": {"converted_from": Path(source).name,
                                                  "architecture": architecture}}, destination)
    return {"architecture": [architecture], "unmapped": unmapped, "missing": missing}


def check_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Raise :class:`CheckpointMismatchError` unless the checkpoint at ``path`` fills exactly ``model``'s
    state dict (same keys, same shapes); an unconverted Pedestron checkpoint is named as such."""
    state = read_state_dict(path)
    problems = _mismatches(state, model.state_dict())
    if not problems:
        return
    try:
        architecture = detect_pedestron_architecture(state)
    except ValueError:
        architecture = None
    if architecture and not any(key.startswith("roi_head.") or key.startswith("neck.deconvs") for key in state):
        raise CheckpointMismatchError(f"{path} is a Pedestron (MMDetection 1.x) {architecture.upper()} checkpoint: "
                                      f"convert it first with tools/convert_pedestron.py {path} OUT.pth")
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise CheckpointMismatchError(f"{path} does not fit the model {type(model).__name__} (a checkpoint of another "
                                  "architecture or configuration?):\n  " + "\n  ".join(shown))
