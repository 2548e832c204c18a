"""Models that take feature maps instead of frames: a detection head on a feature pyramid runs as its
own block-sparse model on the block-sparse backbone's outputs, with the backbone's grid."""
import pytest
import torch
from torch import nn
from torchvision.models.detection.rpn import RPNHead

import blockcopy_core as bc
from nets import resnet_fpn
from oracle import rel_error

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
N, H, W, BLOCK = 2, 128, 192, 64


class BackboneAndHead(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(list(self.backbone(x).values()))


def pyramid_and_head():
    torch.manual_seed(0)
    return resnet_fpn(), RPNHead(256, 3).eval()


def video(frames=4):
    grids = [torch.ones(N, 1, H // BLOCK, W // BLOCK, dtype=torch.bool)]
    grids += [torch.rand(N, 1, H // BLOCK, W // BLOCK) < 0.5 for _ in range(frames - 1)]
    x = torch.randn(N, 3, H, W)
    return [(x + 0.3 * t * torch.randn_like(x), g) for t, g in enumerate(grids)]


def test_head_on_the_backbones_features_equals_one_model_of_both():
    backbone, head = pyramid_and_head()
    whole = bc.convert(BackboneAndHead(backbone, head).eval(), BLOCK)
    sparse_backbone, sparse_head = bc.convert(backbone, BLOCK), bc.convert(head, BLOCK)
    for x, grid in video():
        expected = whole(x, grid)
        features = sparse_backbone(x, grid)
        outputs = sparse_head(list(features.values()), grid)
        assert rel_error(outputs, expected) <= 1e-5
        assert sparse_head.last_stats.executed_blocks == int(grid.sum())
    assert sparse_head.frame_state is None and sparse_backbone.frame_state is not None


def test_feature_inputs_in_a_dict_and_with_blocks_copied():
    backbone, _ = pyramid_and_head()
    convs = nn.ModuleDict({name: nn.Conv2d(256, 8, 3, padding=1) for name in ("0", "1", "2", "3", "pool")})

    class PerLevel(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = convs

        def forward(self, features):
            return {name: self.convs[name](fmap) for name, fmap in features.items()}

    head = PerLevel().eval()
    sparse_head = bc.convert(head, BLOCK)
    frames = video(3)
    features = [backbone(x) for x, _ in frames]
    first = sparse_head(features[0], frames[0][1])
    for name in first:
        torch.testing.assert_close(first[name], convs[name](features[0][name]), rtol=1e-5, atol=1e-5)
    grid = torch.zeros_like(frames[1][1])
    grid[0, 0, 1, 2] = True
    out = sparse_head(features[1], grid)
    stride = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
    for name, s in stride.items():
        t = BLOCK // s
        kept = out[name][1]  # stream 1 executed nothing: all of it copied
        assert torch.equal(kept, first[name][1])
        assert not torch.equal(out[name][0, :, t:2 * t, 2 * t:3 * t], first[name][0, :, t:2 * t, 2 * t:3 * t])
        if t > 2:  # inside the block (its border sees the neighbours' stored features): the fresh conv
            fresh = convs[name](features[1][name])[0, :, t + 1:2 * t - 1, 2 * t + 1:3 * t - 1]
            torch.testing.assert_close(out[name][0, :, t + 1:2 * t - 1, 2 * t + 1:3 * t - 1], fresh,
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (lambda f: [f[0][:, :, :-4]], "does not fit the grid"),  # not the frame scaled by an integer stride
    (lambda f: [f[0][:1]], "N=2"),
    (lambda f: [f[0].long()], "floating-point"),
])
def test_feature_inputs_that_do_not_fit_the_grid_are_named(bad, message):
    _, head = pyramid_and_head()
    features = [torch.randn(N, 256, H // 4, W // 4)]
    grid = torch.ones(N, 1, H // BLOCK, W // BLOCK, dtype=torch.bool)
    with pytest.raises(bc.InvalidInputError, match=message):
        bc.convert(head, BLOCK)(bad(features), grid)


def test_stride_beyond_the_block_size_is_refused_and_formats_are_kept():
    _, head = pyramid_and_head()
    grid = torch.ones(N, 1, H // 32, W // 32, dtype=torch.bool)
    with pytest.raises(bc.InvalidInputError, match="integer stride that divides the block size"):
        bc.convert(head, 32)([torch.randn(N, 256, H // 64, W // 64)], grid)
    sparse = bc.convert(head, BLOCK)
    grid = torch.ones(N, 1, H // BLOCK, W // BLOCK, dtype=torch.bool)
    sparse([torch.randn(N, 256, H // 4, W // 4)], grid)
    with pytest.raises(bc.InvalidInputError, match="changed mid-clip.*strides"):
        sparse([torch.randn(N, 256, H // 8, W // 8)], grid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("no_tf32")
def test_feature_inputs_with_cuda_graphs_match_the_cpu_engine():
    backbone, head = pyramid_and_head()
    cpu_backbone, cpu_head = bc.convert(backbone, BLOCK), bc.convert(head, BLOCK)
    gpu_model = BackboneAndHead(*pyramid_and_head()).eval().cuda()
    gpu_backbone, gpu_head = bc.convert(gpu_model.backbone, BLOCK), bc.convert(gpu_model.head, BLOCK)
    for x, grid in video(6):
        features = gpu_backbone(x.cuda(), grid.cuda())
        executed = gpu_backbone.executed_grid
        out = gpu_head(list(features.values()), executed)
        assert torch.equal(gpu_head.executed_grid, executed), "the backbone's executed grid fills its buckets"
        expected = cpu_head(list(cpu_backbone(x, executed.cpu()).values()), executed.cpu())
        assert rel_error([[t.cpu() for t in level] for level in out], expected) <= 1e-4


def test_bound_head_follows_the_backbones_grid():
    """A framework calls the head with its own signature (rpn_head(features)): bound to the backbone,
    the head runs the blocks the backbone ran."""
    backbone, head = pyramid_and_head()
    whole = bc.convert(BackboneAndHead(backbone, head).eval(), BLOCK)
    sparse_backbone, sparse_head = bc.convert(backbone, BLOCK), bc.convert(head, BLOCK)
    with pytest.raises(bc.InvalidInputError, match="no execution grid"):
        sparse_head([torch.randn(N, 256, H // 4, W // 4)])
    sparse_head.bind(sparse_backbone)
    with pytest.raises(bc.InvalidInputError, match="has not run a frame"):
        sparse_head([torch.randn(N, 256, H // 4, W // 4)])
    for x, grid in video(3):
        sparse_backbone.bind(grid)
        outputs = sparse_head(list(sparse_backbone(x).values()))
        assert rel_error(outputs, whole(x, grid)) <= 1e-5
    assert "_grid_source" not in dict(sparse_head.named_modules()) and not any(
        key.startswith("_grid") for key in sparse_head.state_dict())
    with pytest.raises(TypeError, match="grid tensor or a BlockSparseModel"):
        sparse_head.bind("backbone")
