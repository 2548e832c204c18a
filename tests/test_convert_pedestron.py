"""tools/convert_pedestron.py on synthetic Pedestron checkpoints (their real key names and shapes): CSP and
MGAN files, mean-teacher `.stu` included, convert into checkpoints that load strictly into the models of
configs/_base_/models/; unknown or missing keys fail the conversion unless --allow-missing."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")

from test_mmdet_csp import build_csp, pedestron_name  # noqa: E402
from test_mmdet_mgan import build_mgan, pedestron_state_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import convert_pedestron  # noqa: E402  (tools/convert_pedestron.py)

from blockcopy_mmdet.checkpoint import detect_pedestron_architecture  # noqa: E402


@pytest.fixture(scope="module")
def csp_pedestron() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {pedestron_name(key): value for key, value in build_csp(reduced=False).state_dict().items()}


def _write(path: Path, state: dict) -> str:
    torch.save({"state_dict": state}, path)  # a mean-teacher .stu file holds only this
    return str(path)


def _loaded(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_csp_mean_teacher_file_converts_and_loads_strictly(csp_pedestron, tmp_path, capsys):
    source = _write(tmp_path / "csp.pth.stu", csp_pedestron)
    assert convert_pedestron.main([source, str(tmp_path / "csp.pth")]) == 0
    assert "(CSP)" in capsys.readouterr().out
    converted = _loaded(tmp_path / "csp.pth")
    model = build_csp(reduced=False)
    model.load_state_dict(converted, strict=True)
    assert torch.equal(converted["neck.deconvs.0.weight"], csp_pedestron["neck.p3.weight"])
    assert torch.equal(converted["bbox_head.center_predictor.bias"], csp_pedestron["bbox_head.csp_cls.bias"])


def test_mgan_converts_reorders_the_classifier_and_loads_strictly(tmp_path):
    pedestron = pedestron_state_dict()
    assert detect_pedestron_architecture(pedestron) == "mgan"
    assert convert_pedestron.main([_write(tmp_path / "mgan.pth", pedestron), str(tmp_path / "out.pth")]) == 0
    converted = _loaded(tmp_path / "out.pth")
    build_mgan().load_state_dict(converted, strict=True)
    # Pedestron: rows (background, person); MMDetection 3: (person, background)
    assert torch.equal(converted["roi_head.bbox_head.fc_cls.weight"], pedestron["bbox_head.fc_cls.weight"][[1, 0]])
    assert torch.equal(converted["roi_head.bbox_head.fc_reg.weight"], pedestron["bbox_head.fc_reg.weight"][4:])


def test_unknown_keys_fail_unless_allowed(csp_pedestron, tmp_path, capsys):
    source = _write(tmp_path / "extra.pth", {**csp_pedestron, "bbox_head.refine.weight": torch.zeros(3)})
    out = tmp_path / "out.pth"
    assert convert_pedestron.main([source, str(out)]) == 1
    assert "unmapped Pedestron key: bbox_head.refine.weight" in capsys.readouterr().err and not out.exists()
    assert convert_pedestron.main([source, str(out), "--allow-missing"]) == 0
    assert "1 unmapped keys" in capsys.readouterr().out and out.exists()


def test_missing_keys_fail_unless_allowed(csp_pedestron, tmp_path, capsys):
    partial = {key: value for key, value in csp_pedestron.items() if not key.startswith("bbox_head.offset")}
    source, out = _write(tmp_path / "partial.pth", partial), tmp_path / "out.pth"
    assert convert_pedestron.main([source, str(out)]) == 1
    assert "missing: bbox_head.offset_convs.0.conv.weight" in capsys.readouterr().err and not out.exists()
    assert convert_pedestron.main([source, str(out), "--allow-missing"]) == 0
    assert "missing keys" in capsys.readouterr().out


def test_wrong_shapes_fail_even_when_allowed(csp_pedestron, tmp_path, capsys):
    source = _write(tmp_path / "bad.pth", {**csp_pedestron, "neck.p3.bias": torch.zeros(7)})
    assert convert_pedestron.main([source, str(tmp_path / "out.pth"), "--allow-missing"]) == 1
    assert "shape of neck.deconvs.0.bias: checkpoint (7,), model (256,)" in capsys.readouterr().err


def test_a_checkpoint_of_something_else_is_named(tmp_path):
    source = _write(tmp_path / "resnet.pth", {"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a Pedestron CSP or MGAN checkpoint"):
        convert_pedestron.main([source, str(tmp_path / "out.pth")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_pedestron.main([str(tmp_path / "none.pth"), str(tmp_path / "out.pth")])
