"""Tests for blockcopy_core.graphs.graphed (the CUDA-graph dense reference of the main job and benchmark)."""
import pytest
import torch
from torch import nn

from blockcopy_core.graphs import graphed


class TwoHeads(nn.Module):
    """A dict of two maps and a tuple of one, to exercise nested outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.a, self.b = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, x):
        features = self.body(x)
        return {"a": self.a(features), "rest": (torch.sigmoid(self.b(features)),)}


def test_cpu_example_is_refused():
    with pytest.raises(ValueError, match="CUDA example"):
        graphed(TwoHeads().eval(), torch.zeros(1, 3, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_matches_eager_and_returns_copies():
    torch.manual_seed(0)
    model = TwoHeads().cuda().eval()
    frames = [torch.randn(2, 3, 32, 48, device="cuda") for _ in range(3)]
    with torch.no_grad():
        call = graphed(model, frames[0])
        outputs = [call(frame) for frame in frames]
        for frame, output in zip(frames, outputs):
            expected = model(frame)
            torch.testing.assert_close(output["a"], expected["a"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(output["rest"][0], expected["rest"][0], rtol=1e-5, atol=1e-5)
        assert isinstance(outputs[0]["rest"], tuple)
        assert not torch.equal(outputs[0]["a"], outputs[1]["a"]), "each call returns its own copy"
        with pytest.raises(ValueError, match="captured for"):
            call(torch.zeros(1, 3, 32, 48, device="cuda"))
