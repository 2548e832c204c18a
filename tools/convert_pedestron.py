"""Convert a Pedestron (MMDetection 1.x) CSP or MGAN checkpoint for this project's MMDetection 3 models.

    python tools/convert_pedestron.py IN OUT [--architecture csp|mgan] [--allow-missing] [--trust-pickle]

IN may be a regular checkpoint or a mean-teacher ``.stu`` file (a dict holding only ``state_dict``). Every
Pedestron key must map onto the model (``configs/_base_/models/csp_r50.py`` or ``mgan_vgg16.py``) and fill
all of it; otherwise the unknown and missing keys are listed and nothing is written, unless
``--allow-missing`` is given. OUT loads with ``tools/test.py CONFIG OUT``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from blockcopy_mmdet.checkpoint import (  # noqa: E402
    PEDESTRON_ARCHITECTURES,
    CheckpointMismatchError,
    convert_pedestron_checkpoint,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a Pedestron CSP / MGAN checkpoint to MMDetection 3")
    parser.add_argument("input", help="Pedestron checkpoint (.pth, or a mean-teacher .stu file)")
    parser.add_argument("output", help="where to write the converted checkpoint")
    parser.add_argument("--architecture", choices=sorted(PEDESTRON_ARCHITECTURES),
                        help="default: recognised from the checkpoint's keys")
    parser.add_argument("--allow-missing", action="store_true",
                        help="write the checkpoint even if keys are unknown or model parameters are not filled")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read a trusted file holding Python objects besides tensors (full unpickling)")
    args = parser.parse_args(argv)
    try:
        report = convert_pedestron_checkpoint(args.input, args.output, args.architecture, args.allow_missing,
                                              args.trust_pickle)
    except CheckpointMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.input} ({report['architecture'][0].upper()}) -> {args.output}")
    for kind in ("unmapped", "missing"):
        if report[kind]:
            print(f"{len(report[kind])} {kind} keys (--allow-missing): " + ", ".join(report[kind]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
