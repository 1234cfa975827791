"""The box head's RoIAlign: torchvision's outputs bit for bit, and the gradient of torchvision's kernel."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

from mitdet.models import build_detector
from mitdet.models.roi_align import MultiScaleRoIAlign, roi_align_backward
from mitdet.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def _boxes(g: torch.Generator, n: int, width: float, height: float) -> torch.Tensor:
    """Boxes of every kind the RPN hands over: inside, across and beyond the border, under one pixel, large."""
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 1.1, height * 1.1]) - torch.tensor([5.0, 5.0])
    wh = torch.rand(n, 2, generator=g) ** 3 * torch.tensor([width, height]) + 0.05
    return torch.cat([xy, xy + wh], 1)


def _features(g: torch.Generator, n: int, channels: int, height: int, width: int, dtype=torch.float32):
    return OrderedDict((str(i), torch.randn(n, channels, height >> i, width >> i, generator=g, dtype=dtype,
                                            requires_grad=True)) for i in range(4))


@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_are_torchvision_bit_for_bit_and_gradients_agree(channels_last):
    g = torch.Generator().manual_seed(0)
    image_shapes = [(512, 768), (480, 768), (512, 700)]
    feats = _features(g, 3, 4, 128, 192)
    if channels_last:
        feats = OrderedDict((k, v.detach().to(memory_format=torch.channels_last).requires_grad_())
                            for k, v in feats.items())
    large = torch.tensor([[0.0, 0, 760, 510], [30, 20, 500, 400], [100, 50, 380, 300]])  # the upper levels
    boxes = [torch.cat([_boxes(g, 60, 768, 512), large]), torch.zeros(0, 4), _boxes(g, 42, 700, 512)]
    ours = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    out_ours, out_theirs = ours(feats, boxes, image_shapes), theirs(feats, boxes, image_shapes)
    assert out_ours.shape == (105, 4, 7, 7) and torch.equal(out_ours, out_theirs)
    levels = ours.map_levels(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}  # the boxes reach every pyramid level
    upstream = torch.randn(out_ours.shape, generator=g)
    grads_ours = torch.autograd.grad(out_ours, list(feats.values()), upstream)
    grads_theirs = torch.autograd.grad(out_theirs, list(feats.values()), upstream)
    for a, b in zip(grads_ours, grads_theirs, strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation is torchvision's path itself
        assert torch.equal(ours(feats, boxes, image_shapes), out_theirs)


def test_backward_is_the_exact_gradient_in_double_precision():
    g = torch.Generator().manual_seed(1)
    feature = torch.randn(2, 3, 6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = _boxes(g, 7, 18, 12).double()
    rois = torch.cat([torch.tensor([[0.0], [1], [1], [0], [1], [0], [1]], dtype=torch.float64), boxes], 1)

    def pooled(f):
        return torchvision.ops.roi_align(f, rois, (3, 4), spatial_scale=0.5, sampling_ratio=2)

    grad_out = torch.randn(7, 3, 3, 4, generator=g, dtype=torch.float64)
    expected, = torch.autograd.grad(pooled(feature), feature, grad_out)
    ours = roi_align_backward(grad_out, rois, feature.shape, 0.5, (3, 4), 2)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    # and the numerical Jacobian of the forward, through the pooler's autograd function
    from mitdet.models.roi_align import _RoIAlign
    assert torch.autograd.gradcheck(lambda f: _RoIAlign.apply(f, rois, 0.5, (3, 4), 2), (feature,))


def test_a_training_step_of_the_detector_matches_torchvisions_pooler():
    params = load_params(ROOT / "params.yaml").model
    torch.manual_seed(0)
    model = build_detector("mit_b0", 4, params)
    assert isinstance(model.roi_heads.box_roi_pool, MultiScaleRoIAlign)
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 120, 200, generator=g), torch.rand(3, 150, 110, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 80, 90], [100, 20, 190, 110]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 30, 60, 140]]), "labels": torch.tensor([2])}]
    model.train()
    results = []
    for pool in (model.roi_heads.box_roi_pool, torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)):
        model.roi_heads.box_roi_pool = pool
        torch.manual_seed(3)  # the same proposals sampled
        losses = model(images, targets)
        model.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        results.append(({k: v.item() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_ours, grad_ours), (loss_theirs, grad_theirs) = results
    assert loss_ours == loss_theirs  # the forward is torchvision's kernel
    assert grad_ours.keys() == grad_theirs.keys() and any("backbone.body" in n for n in grad_ours)
    for name in grad_ours:  # the sum order differs: compared as whole tensors (a bias gradient sums to near 0)
        diff = (grad_ours[name] - grad_theirs[name]).norm() / grad_theirs[name].norm().clamp(min=1e-12)
        assert diff < 1e-5, (name, diff.item())
