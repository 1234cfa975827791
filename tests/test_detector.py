"""Faster R-CNN + FPN on MiT: losses and gradients on real COCO images, params applied, size and GFLOPs."""
from __future__ import annotations

import dataclasses
import json

import cv2
import pytest
import torch

from mitdet.models import build_detector, build_mit, count_parameters, detector_gflops
from mitdet.params import ModelParams, RoiParams, RpnParams

LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def small_params(**overrides) -> ModelParams:
    """Light settings for 2-core tests; every value differs from torchvision's default so we see it applied."""
    return dataclasses.replace(ModelParams(
        drop_path_rate=0.1, fpn_channels=32, anchor_sizes=[8, 16, 32, 64, 128], aspect_ratios=[0.5, 1.0, 2.0, 3.0],
        min_size=96, max_size=128,
        rpn=RpnParams(pre_nms_top_n_train=300, pre_nms_top_n_test=200, post_nms_top_n_train=150,
                      post_nms_top_n_test=100, nms_thresh=0.65, fg_iou_thresh=0.6, bg_iou_thresh=0.25,
                      batch_size_per_image=64, positive_fraction=0.4),
        roi=RoiParams(batch_size_per_image=32, positive_fraction=0.3, fg_iou_thresh=0.45, bg_iou_thresh=0.45,
                      score_thresh=0.0, nms_thresh=0.4, detections_per_img=7)), **overrides)


@pytest.fixture
def coco_batch(fixtures_dir):
    """Two real COCO val2017 images with their non-crowd boxes (xyxy) and contiguous labels 1..80."""
    root = fixtures_dir / "coco2017-tiny50"
    gt = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    label = {c["id"]: i for i, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]), start=1)}
    images, targets = [], []
    for info in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]]
        if not anns:
            continue
        bgr = cv2.imread(str(root / "val2017" / info["file_name"]), cv2.IMREAD_COLOR)
        images.append(torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        targets.append({"boxes": boxes, "labels": torch.tensor([label[a["category_id"]] for a in anns])})
        if len(images) == 2:
            return images, targets, len(label) + 1


def test_training_forward_gives_the_four_losses_and_finite_gradients(coco_batch):
    images, targets, num_classes = coco_batch
    torch.manual_seed(0)
    model = build_detector("mit_b0", num_classes, small_params()).train()
    losses = model(images, targets)
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # every part learns: encoder's first and last stages, FPN, RPN and box heads
    for name in ("backbone.body.patch_embed1.proj.weight", "backbone.body.block4.1.mlp.fc2.weight",
                 "backbone.fpn.layer_blocks.0.0.weight", "rpn.head.conv.0.0.weight",
                 "roi_heads.box_predictor.cls_score.weight"):
        assert grads[name].abs().sum() > 0, name


def test_eval_forward_returns_boxes_labels_and_scores_within_the_image(coco_batch):
    images, _, num_classes = coco_batch
    torch.manual_seed(0)
    model = build_detector("mit_b0", num_classes, small_params()).eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for image, out in zip(images, outputs, strict=True):
        n = len(out["boxes"])
        assert n == 7  # detections_per_img, with score_thresh 0 so the list is full
        assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,) and out["scores"].shape == (n,)
        assert out["labels"].min() >= 1 and out["labels"].max() < num_classes
        assert torch.all(out["scores"][:-1] >= out["scores"][1:])
        h, w = image.shape[-2:]  # boxes come back in the input image's pixels
        assert out["boxes"][:, 0::2].max() <= w and out["boxes"][:, 1::2].max() <= h


def test_every_model_param_is_applied():
    p = small_params()
    model = build_detector("mit_b1", 5, p)
    assert model.backbone.out_channels == 32
    assert model.backbone.body.out_channels == [64, 128, 320, 512]
    assert [blk.out_channels for blk in model.backbone.fpn.layer_blocks] == [32] * 4
    gen = model.rpn.anchor_generator
    assert gen.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert gen.aspect_ratios == ((0.5, 1.0, 2.0, 3.0),) * 5
    assert model.rpn.head.cls_logits.out_channels == 4  # anchors per location = aspect ratios
    assert model.rpn._pre_nms_top_n == {"training": 300, "testing": 200}
    assert model.rpn._post_nms_top_n == {"training": 150, "testing": 100}
    assert model.rpn.nms_thresh == 0.65
    assert (model.rpn.proposal_matcher.high_threshold, model.rpn.proposal_matcher.low_threshold) == (0.6, 0.25)
    assert model.rpn.fg_bg_sampler.batch_size_per_image == 64
    assert model.rpn.fg_bg_sampler.positive_fraction == 0.4
    roi = model.roi_heads
    assert (roi.fg_bg_sampler.batch_size_per_image, roi.fg_bg_sampler.positive_fraction) == (32, 0.3)
    assert (roi.proposal_matcher.high_threshold, roi.proposal_matcher.low_threshold) == (0.45, 0.45)
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (0.0, 0.4, 7)
    assert roi.box_predictor.cls_score.out_features == 5
    assert model.transform.max_size == 128
    assert model.transform.image_mean == [0.485, 0.456, 0.406]
    assert model.transform.image_std == [0.229, 0.224, 0.225]
    assert not hasattr(model.backbone.body.block1[0].drop_path, "p")  # rate 0: an Identity
    assert model.backbone.body.block4[1].drop_path.p == pytest.approx(0.1)


def test_multi_scale_sizes_apply_in_training_and_min_size_in_eval():
    model = build_detector("mit_b0", 3, small_params(max_size=256), train_min_sizes=(64, 128))
    image = torch.rand(3, 200, 300)
    assert model.training and model.transform.min_size == (64, 128)
    torch.manual_seed(0)
    sides = {min(model.transform([image])[0].image_sizes[0]) for _ in range(20)}
    assert sides == {64, 128}
    model.eval()
    assert model.transform([image])[0].image_sizes[0] == (96, 144)  # shorter side = model.min_size
    model.train()
    assert model.transform.min_size == (64, 128)


def test_an_image_already_at_an_allowed_size_is_not_resized_again():
    # mitdet's loader resizes (seeded, multi-scale included); the detector must not draw a second size
    model = build_detector("mit_b0", 3, small_params(max_size=256), train_min_sizes=(64, 128))
    loaded = torch.rand(3, 128, 200)  # the loader's output at the 128 scale
    torch.manual_seed(0)
    for _ in range(10):
        batch = model.transform([loaded])[0]
        assert batch.image_sizes[0] == (128, 200)
        expected = (loaded - torch.tensor(model.transform.image_mean)[:, None, None]) / torch.tensor(
            model.transform.image_std)[:, None, None]
        assert torch.equal(batch.tensors[0, :, :128, :200], expected)
    model.eval()  # eval size: shorter side model.min_size (96 in small_params)
    assert model.transform([torch.rand(3, 96, 150)])[0].image_sizes[0] == (96, 150)
    assert model.transform([loaded])[0].image_sizes[0] == (96, 150)  # a 128 image is brought to 96


def test_pretrained_weights_and_frozen_stages_come_from_params(tmp_path):
    torch.manual_seed(5)
    encoder = build_mit("mit_b0")
    torch.save({"state_dict": encoder.state_dict()}, tmp_path / "mit_b0.pth")
    model = build_detector("mit_b0", 3, small_params(pretrained=str(tmp_path / "mit_b0.pth"), frozen_stages=1))
    body = model.backbone.body
    assert all(torch.equal(v, body.state_dict()[k]) for k, v in encoder.state_dict().items())
    assert not any(p.requires_grad for p in body.block1.parameters())
    assert all(p.requires_grad for p in body.block2.parameters())
    model.train()
    assert not body.norm1.training and body.norm2.training
    assert count_parameters(model, trainable_only=True) < count_parameters(model)


def test_parameter_count_and_gflops_are_plausible_and_grow_with_input_size():
    model = build_detector("mit_b0", 3, small_params()).train()
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters())
    encoder = count_parameters(model.backbone.body)
    assert 3.30e6 < encoder < 3.34e6 and n > encoder
    small, large = detector_gflops(model, 96, 128), detector_gflops(model, 192, 256)
    assert model.training  # the mode it had is restored
    # the encoder alone: ~0.2 GFLOPs at 96 x 128 for MiT-b0; the RPN and box heads add a fixed share
    assert 0.1 < small < large < 20.0
    gflops_b1 = detector_gflops(build_detector("mit_b1", 3, small_params()), 96, 128)
    assert gflops_b1 > small


def test_channels_last_option_trains_and_gives_the_same_losses():
    images = [torch.rand(3, 96, 128), torch.rand(3, 112, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 80.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 40.0, 90.0, 100.0]]),
                "labels": torch.tensor([2, 1])}]
    torch.manual_seed(0)
    plain = build_detector("mit_b0", 3, small_params(drop_path_rate=0.0))
    fast = build_detector("mit_b0", 3, small_params(drop_path_rate=0.0, channels_last=True))
    fast.load_state_dict(plain.state_dict())
    assert fast.backbone.body.patch_embed1.proj.weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    a = plain(images, targets)
    torch.manual_seed(1)
    b = fast(images, targets)
    for key in LOSSES:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key


def test_compile_option_keeps_the_state_dict_names():
    plain = build_detector("mit_b0", 3, small_params())
    compiled = build_detector("mit_b0", 3, small_params(compile=True))
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.slow
def test_compiled_backbone_gives_the_same_detections():
    torch.manual_seed(0)
    plain = build_detector("mit_b0", 3, small_params()).eval()
    compiled = build_detector("mit_b0", 3, small_params(compile=True)).eval()
    compiled.load_state_dict(plain.state_dict())
    image = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        a, b = plain(image)[0], compiled(image)[0]
    assert torch.allclose(a["scores"], b["scores"], atol=1e-4)
