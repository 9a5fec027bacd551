"""Model construction, torchvision-compatible state dicts, checkpoints, training losses, bad input."""
from __future__ import annotations

import json

import maskstream.model as model
import pytest
import torch
from maskstream.model.checkpoint import CheckpointError
from maskstream.model.mask_rcnn import imagenet_mobilenet_v2_path
from maskstream.model.synthetic import make_scene

from tests.shared_data import REFERENCE, require

MANIFESTS = {"v1": "torchvision_maskrcnn_resnet50_fpn.json", "v2": "torchvision_maskrcnn_resnet50_fpn_v2.json"}


def manifest(name: str) -> list[tuple[str, list[int]]]:
    data = json.loads(require(REFERENCE / name).read_text())
    return [(p["name"], p["shape"]) for p in data["params"]]


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_state_dict_equals_torchvision_manifest(variant):
    state = model.build(variant).state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == manifest(MANIFESTS[variant])


def test_lite_backbone_matches_torchvision_mobilenet_v2():
    body = model.build("lite").backbone.body.state_dict()
    expected = [(k, s) for k, s in manifest("torchvision_mobilenet_v2.json") if k.startswith("features.")]
    assert [(k, list(v.shape)) for k, v in body.items()] == expected


def test_lite_loads_imagenet_backbone():
    try:
        path = imagenet_mobilenet_v2_path()
    except CheckpointError as exc:
        pytest.skip(str(exc))
    m = model.build("lite", weights_backbone="imagenet")
    reference = torch.load(path, weights_only=True)
    assert torch.equal(m.backbone.body.features[0][0].weight, reference["features.0.0.weight"])
    assert torch.equal(m.backbone.body.features[18][1].running_var, reference["features.18.1.running_var"])


def test_torchvision_frozen_bn_checkpoint_loads_strictly():
    """torchvision's COCO checkpoints come from FrozenBatchNorm2d: no num_batches_tracked keys."""
    state = {k: v for k, v in model.build("v1").state_dict().items() if not k.endswith("num_batches_tracked")}
    state["roi_heads.box_predictor.cls_score.bias"] = torch.arange(91, dtype=torch.float32)
    m = model.build("v1", checkpoint=state)
    assert torch.equal(m.roi_heads.box_predictor.cls_score.bias, torch.arange(91, dtype=torch.float32))


def test_wrong_checkpoint_names_the_keys(tmp_path):
    state = model.build("lite").state_dict()
    del state["rpn.head.cls_logits.weight"]
    state["rpn.head.extra.weight"] = torch.zeros(1)
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 512)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        model.build("lite", checkpoint=path)
    message = str(err.value)
    assert str(path) in message
    assert "1 missing keys: rpn.head.cls_logits.weight" in message
    assert "1 unexpected keys: rpn.head.extra.weight" in message
    assert "roi_heads.box_predictor.cls_score.weight (checkpoint [3, 512], model [91, 512])" in message


def test_unreadable_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read as a torch state dict"):
        model.build("lite", checkpoint=path)
    with pytest.raises(CheckpointError, match="no such file"):
        model.build("lite", checkpoint=tmp_path / "missing.pt")


def test_torchvision_keyword_overrides():
    m = model.build("lite", num_classes=5, box_score_thresh=0.5, rpn_post_nms_top_n_test=300, min_size=320)
    assert m.roi_heads.score_thresh == 0.5
    assert m.roi_heads.box_predictor.cls_score.out_features == 5
    assert m.cfg.rpn.post_nms_top_n_test == 300 and m.cfg.transform.min_size == 320
    with pytest.raises(TypeError, match="unknown option 'box_score_threshold'"):
        model.build("lite", box_score_threshold=0.5)
    with pytest.raises(ValueError, match="variant: expected one of"):
        model.build("v3")


@pytest.fixture(scope="module")
def lite():
    torch.manual_seed(0)
    return model.build("lite", min_size=256, max_size=320, box_score_thresh=0.0, box_detections_per_img=10)


def test_eval_output_is_torchvision_shaped(lite):
    lite.eval()
    images = [torch.rand(3, 200, 240), torch.rand(3, 160, 300)]
    with torch.no_grad():
        out = lite(images)
    assert len(out) == 2
    for img, det in zip(images, out):
        n = len(det["boxes"])
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        assert det["boxes"].shape == (n, 4) and det["labels"].dtype == torch.int64
        assert det["masks"].shape == (n, 1, *img.shape[-2:])
        assert (det["boxes"][:, 2] <= img.shape[2]).all() and (det["boxes"][:, 3] <= img.shape[1]).all()
        assert n == 10  # score threshold 0: every slot filled


def test_bad_images_name_what_was_expected(lite):
    lite.eval()
    with pytest.raises(ValueError, match=r"images\[0\]: expected a float tensor.*torch.uint8"):
        lite([torch.zeros(3, 64, 64, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"images\[1\]: expected shape \[3, H, W\].*\[64, 64, 3\]"):
        lite([torch.rand(3, 64, 64), torch.rand(64, 64, 3)])
    with pytest.raises(ValueError, match="images: expected a non-empty list"):
        lite([])


def test_training_losses_are_finite_and_backpropagate(lite):
    lite.train()
    scenes = [make_scene(seed, height=192, width=256) for seed in (1, 2)]
    images = [torch.from_numpy(s.image.copy()).permute(2, 0, 1).float() / 255 for s in scenes]
    targets = [
        {
            "boxes": torch.from_numpy(s.boxes.copy()),
            "labels": torch.from_numpy(s.labels.copy()),
            "masks": torch.from_numpy(s.masks.copy()).to(torch.uint8),
        }
        for s in scenes
    ]
    losses = lite(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert lite.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    assert lite.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0  # through RoIAlign
    with pytest.raises(ValueError, match="targets: required in training mode"):
        lite(images)
    lite.eval()


def test_mask_targets_are_torchvision_roi_align_of_the_matched_mask():
    """project_masks_on_boxes = RoIAlign(scale 1, adaptive sampling) of each box's own gt mask."""
    from maskstream.model.ops import RoIAlignAttrs, roi_align_reference
    from maskstream.model.roi_heads import project_masks_on_boxes

    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(3, 40, 50, generator=g) > 0.5).to(torch.uint8)
    boxes = torch.tensor([[2.0, 3.0, 30.5, 20.0], [10.0, 0.0, 49.0, 39.0], [0.5, 0.5, 7.25, 12.0]])
    matched = torch.tensor([2, 0, 1])
    ours = project_masks_on_boxes(masks, matched, boxes, 28)
    # The reference is multi-level; with first_level=0 and canonical_level=0 every box here
    # maps to level 0, whose scale is 1.
    levels = [masks.double()[None]] * 4
    attrs = RoIAlignAttrs(28, sampling_ratio=-1, canonical_level=0, first_level=0)
    ref = roi_align_reference(levels, boxes.double()[None], attrs)
    ref = ref[0, torch.arange(3), matched]  # [R, 28, 28]
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["v1", "v2", "lite"])
def test_shipped_configs_mirror_the_defaults(variant):
    from maskstream.pipeline.cli.main import CONFIG_DIR
    from maskstream.pipeline.config import load_config

    assert load_config(model.ModelConfig, CONFIG_DIR / f"model_{variant}.yaml") == model.default_config(variant)


def test_v2_runs_eval_and_train():
    torch.manual_seed(0)
    m = model.build("v2", min_size=128, max_size=160, box_score_thresh=0.0, box_detections_per_img=5)
    m.eval()
    with torch.no_grad():
        [det] = m([torch.rand(3, 120, 150)])
    assert det["masks"].shape == (5, 1, 120, 150)
    m.train()
    scene = make_scene(4, height=128, width=160)
    target = {
        "boxes": torch.from_numpy(scene.boxes.copy()),
        "labels": torch.from_numpy(scene.labels.copy()),
        "masks": torch.from_numpy(scene.masks.copy()).to(torch.uint8),
    }
    image = torch.from_numpy(scene.image.copy()).permute(2, 0, 1).float() / 255
    losses = m([image, image], [target, target])  # BatchNorm heads need more than one value per channel
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("variant", ["v2", "lite"])
def test_folded_batch_norms_give_the_same_detections(variant):
    from maskstream.model.fuse import fold_batch_norms

    torch.manual_seed(0)
    m = model.build(variant, min_size=128, max_size=160, box_score_thresh=0.0, box_detections_per_img=5).eval()
    for norm in m.modules():  # non-trivial statistics, so folding has something to do
        if isinstance(norm, torch.nn.BatchNorm2d | model.backbone.FrozenBatchNorm2d):
            norm.running_mean.uniform_(-0.1, 0.1)
            norm.running_var.uniform_(0.5, 1.5)
    folded = fold_batch_norms(m)
    norms = (torch.nn.BatchNorm2d, model.backbone.FrozenBatchNorm2d)
    assert not any(isinstance(x, norms) for x in folded.modules())
    assert any(isinstance(x, norms) for x in m.modules())  # the original is untouched
    image = torch.rand(3, 120, 150)
    with torch.no_grad():
        [a], [b] = m([image]), folded([image])
    torch.testing.assert_close(b["boxes"], a["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(b["scores"], a["scores"], atol=1e-5, rtol=1e-4)
    assert torch.equal(b["labels"], a["labels"])


@pytest.mark.parametrize(("fine", "coarse"), [((8, 12), (4, 6)), ((9, 12), (5, 6)), ((8, 8), (3, 3))])
def test_fpn_top_down_add_equals_nearest_upsample(fine, coarse):
    from maskstream.model.backbone import add_upsampled

    a, b = torch.randn(2, 3, *fine), torch.randn(2, 3, *coarse)
    expected = a + torch.nn.functional.interpolate(b, size=fine, mode="nearest")
    assert torch.equal(add_upsampled(a, b), expected)
