"""Tests for blockcopy_core.graphs.graphed and graphed_by_shape (the CUDA-graph dense references of the main
job and the benchmarks) and protocol.compile_dense, which captures its compiled programs with them."""
import pytest
import torch
from torch import nn

from blockcopy_core.graphs import graphed, graphed_by_shape
from blockcopy_core.protocol import compile_dense


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True], ids=["graphed_by_shape", "compile_dense"])
@pytest.mark.usefixtures("no_tf32")
def test_each_input_shape_gets_its_own_graph(compiled):
    """Two frame sizes in turn: each replays its own graph (compile_dense: its own compiled program too),
    outputs equal to the eager model's and not overwritten by the next call."""
    torch.manual_seed(0)
    model = TwoHeads().cuda().eval()
    frames = [torch.randn(1, 3, *size, device="cuda") for size in ((32, 48), (64, 32), (32, 48), (64, 32))]
    tol = 1e-4 if compiled else 1e-5  # inductor's own fusion order; fp32 without TF32
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        call = compile_dense(model, frames[0]) if compiled else graphed_by_shape(model)
        outputs = [call(frame) for frame in frames]
        for frame, output in zip(frames, outputs):
            expected = model(frame)
            torch.testing.assert_close(output["a"], expected["a"], rtol=tol, atol=tol)
            torch.testing.assert_close(output["rest"][0], expected["rest"][0], rtol=tol, atol=tol)
    torch._dynamo.reset()
