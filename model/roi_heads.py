"""Box and mask heads on RoIAligned proposals, their losses, and detection postprocessing.

Like the RPN, inference works on padded batches ([B, P, 4] proposals plus counts) so the same
code is the eager path and the static export graph.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from maskstream.model import ops  # noqa: F401  (registers torch.ops.maskstream.*)
from maskstream.model.backbone import NormLayer, conv_norm_act
from maskstream.model.boxes import BoxCoder, box_iou, clip_boxes, is_large_enough
from maskstream.model.config import RoIHeadsConfig
from maskstream.model.matching import Matcher, sample_balanced
from torch import Tensor, nn

BOX_POOL_SIZE = 7
MASK_POOL_SIZE = 14
SAMPLING_RATIO = 2


def roi_align(features: list[Tensor], boxes: Tensor, output_size: int) -> Tensor:
    """P2..P5 and boxes [B, R, 4] -> pooled features [B*R, C, S, S] (one custom op)."""
    pooled = torch.ops.maskstream.multiscale_roi_align(*features[:4], boxes, output_size, SAMPLING_RATIO)
    return pooled.flatten(0, 1)  # [B*R, C, S, S]


class TwoMLPHead(nn.Module):
    """v1 box head: two fully connected layers."""

    def __init__(self, in_features: int, representation: int):
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation)
        self.fc7 = nn.Linear(representation, representation)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


def conv_fc_head(channels: int, representation: int, norm: NormLayer) -> nn.Sequential:
    """v2 box head: four 3x3 conv+BN+ReLU, then one fully connected layer (torchvision's
    FastRCNNConvFCHead; the indices 0..6 are its parameter names)."""
    convs = [conv_norm_act(channels, channels, 3, norm=norm) for _ in range(4)]
    return nn.Sequential(
        *convs, nn.Flatten(), nn.Linear(channels * BOX_POOL_SIZE**2, representation), nn.ReLU(inplace=True)
    )


class FastRCNNPredictor(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


def mask_head(channels: int, norm: NormLayer | None) -> nn.Sequential:
    """Four 3x3 convs at 14x14 (torchvision's MaskRCNNHeads)."""
    return nn.Sequential(*(conv_norm_act(channels, channels, 3, norm=norm) for _ in range(4)))


class MaskRCNNPredictor(nn.Sequential):
    """2x upsampling (14 -> 28) then one mask logit map per class."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__(
            OrderedDict(
                conv5_mask=nn.ConvTranspose2d(channels, channels, 2, 2, 0),
                relu=nn.ReLU(inplace=True),
                mask_fcn_logits=nn.Conv2d(channels, num_classes, 1),
            )
        )
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")


class RoIHeads(nn.Module):
    def __init__(
        self,
        cfg: RoIHeadsConfig,
        box_head: nn.Module,
        box_predictor: FastRCNNPredictor,
        mask_head: nn.Module,
        mask_predictor: MaskRCNNPredictor,
    ):
        super().__init__()
        self.cfg = cfg
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.box_coder = BoxCoder(cfg.bbox_reg_weights)
        # The pooler is swappable so a benchmark can put a torchvision-style per-level loop
        # in its place; it is plain wiring, not configuration.
        self.pool = roi_align
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=False)
        # torchvision's attribute names, so `model.roi_heads.score_thresh = 0.5` works as there.
        self.score_thresh = cfg.score_thresh
        self.nms_thresh = cfg.nms_thresh
        self.detections_per_img = cfg.detections_per_img

    def classify(self, features: list[Tensor], boxes: Tensor) -> tuple[Tensor, Tensor]:
        """boxes [B, R, 4] -> class logits [B*R, C], box deltas [B*R, C*4]."""
        return self.box_predictor(self.box_head(self.pool(features, boxes, BOX_POOL_SIZE)))

    def mask_logits(self, features: list[Tensor], boxes: Tensor) -> Tensor:
        """boxes [B, R, 4] -> mask logits [B*R, C, 28, 28]."""
        return self.mask_predictor(self.mask_head(self.pool(features, boxes, MASK_POOL_SIZE)))

    def mask_probs(self, features: list[Tensor], boxes: Tensor, labels: Tensor) -> Tensor:
        """boxes [B, R, 4], labels [B, R] -> probabilities of each box's own class [B, R, 28, 28]."""
        b, r = labels.shape
        logits = self.mask_logits(features, boxes)
        logits = logits.view(b, r, logits.shape[1], *logits.shape[-2:])  # [B, R, C, 28, 28]
        index = labels.view(b, r, 1, 1, 1).expand(-1, -1, 1, *logits.shape[-2:])
        # float(): an fp16 graph's float16 logits (model.static.with_precision) cast after the pick, 1/C of them.
        return logits.gather(2, index).squeeze(2).float().sigmoid()

    def detect(
        self, features: list[Tensor], proposals: Tensor, num_proposals: Tensor, image_sizes: Tensor
    ) -> dict[str, Tensor]:
        """Padded proposals -> padded detections: boxes [B, K, 4], scores [B, K], labels [B, K], num [B]."""
        b, p = proposals.shape[:2]
        class_logits, deltas = self.classify(features, proposals)
        num_classes = class_logits.shape[-1]
        boxes = self.box_coder.decode(deltas.view(b, p, -1), proposals)  # [B, P, C, 4]
        boxes = clip_boxes(boxes, image_sizes[:, :1, None], image_sizes[:, 1:, None])
        scores = F.softmax(class_logits, -1).view(b, p, num_classes)
        labels = torch.arange(num_classes, device=boxes.device).view(1, 1, -1).expand(b, p, -1)
        # Drop the background column; flatten (proposal, class) pairs as torchvision does.
        boxes = boxes[:, :, 1:].reshape(b, -1, 4)  # [B, P*(C-1), 4]
        scores, labels = scores[:, :, 1:].reshape(b, -1), labels[:, :, 1:].reshape(b, -1)
        real = torch.arange(p, device=boxes.device)[None, :] < num_proposals[:, None]  # [B, P]
        valid = real.repeat_interleave(num_classes - 1, dim=1) & is_large_enough(boxes, self.cfg.min_box_size)
        scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        keep, num = torch.ops.maskstream.batched_nms_padded(
            boxes, scores, labels, float(self.nms_thresh), float(self.score_thresh), int(self.detections_per_img)
        )
        filled = keep >= 0
        index = keep.clamp(min=0)
        return {
            "boxes": torch.where(filled[..., None], boxes.gather(1, index[..., None].expand(-1, -1, 4)), 0.0),
            "scores": torch.where(filled, scores.gather(1, index), 0.0),
            "labels": torch.where(filled, labels.gather(1, index), 0),
            "num_detections": num,
        }

    # ------------------------------------------------------------------ training

    def loss(self, features: list[Tensor], proposals: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """Fast R-CNN classification + box regression, and the mask loss on positives."""
        sampled, labels, gt_index = [], [], []
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            props = torch.cat([props, gt_boxes])  # ground truth always among the candidates
            if gt_boxes.numel() == 0:
                matches = torch.full((props.shape[0],), -1, dtype=torch.int64, device=props.device)
            else:
                matches = self.matcher(box_iou(gt_boxes, props))
            lab = gt_labels[matches.clamp(min=0)] if gt_boxes.numel() else torch.zeros_like(matches)
            lab = torch.where(matches == -1, 0, lab)
            lab = torch.where(matches == -2, -1, lab)
            pos, neg = sample_balanced(lab, self.cfg.batch_size_per_image, self.cfg.positive_fraction)
            keep = torch.where(pos | neg)[0]
            sampled.append(props[keep])
            labels.append(lab[keep])
            gt_index.append(matches[keep].clamp(min=0))

        padded = nn.utils.rnn.pad_sequence(sampled, batch_first=True)  # [B, S, 4]
        class_logits, deltas = self.classify(features, padded)
        rows = _real_rows(sampled, padded.shape[1])
        class_logits, deltas = class_logits[rows], deltas[rows]
        all_labels = torch.cat(labels)
        matched_gt = torch.cat(
            [t["boxes"][g] if t["boxes"].numel() else s for t, g, s in zip(targets, gt_index, sampled)]
        )
        reg_targets = self.box_coder.encode(matched_gt, torch.cat(sampled))

        loss_classifier = F.cross_entropy(class_logits, all_labels)
        pos = torch.where(all_labels > 0)[0]
        deltas = deltas.view(deltas.shape[0], -1, 4)
        loss_box = F.smooth_l1_loss(
            deltas[pos, all_labels[pos]], reg_targets[pos], beta=1 / 9, reduction="sum"
        ) / max(all_labels.numel(), 1)

        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box}
        losses["loss_mask"] = self._mask_loss(features, sampled, labels, gt_index, targets)
        return losses

    def _mask_loss(
        self,
        features: list[Tensor],
        sampled: list[Tensor],
        labels: list[Tensor],
        gt_index: list[Tensor],
        targets: list[dict],
    ) -> Tensor:
        positives = [torch.where(lab > 0)[0] for lab in labels]
        pos_boxes = [s[p] for s, p in zip(sampled, positives)]
        if sum(len(p) for p in positives) == 0:
            # No positives: a zero that still touches the mask branch, so DDP sees every parameter.
            return torch.stack([p.sum() for p in self.mask_predictor.parameters()]).sum() * 0.0
        padded = nn.utils.rnn.pad_sequence(pos_boxes, batch_first=True)
        logits = self.mask_logits(features, padded)
        logits = logits[_real_rows(pos_boxes, padded.shape[1])]
        pos_labels = torch.cat([lab[p] for lab, p in zip(labels, positives)])
        size = logits.shape[-1]
        mask_targets = torch.cat(
            [
                project_masks_on_boxes(t["masks"], g[p], b, size)
                for t, g, p, b in zip(targets, gt_index, positives, pos_boxes)
            ]
        )
        picked = logits[torch.arange(len(pos_labels), device=logits.device), pos_labels]
        return F.binary_cross_entropy_with_logits(picked, mask_targets)


def _real_rows(parts: list[Tensor], width: int) -> Tensor:
    """Indices of the real rows when `parts` are padded to [B, width] and flattened to [B*width]."""
    return torch.cat([torch.arange(len(p), device=p.device) + i * width for i, p in enumerate(parts)])


def project_masks_on_boxes(gt_masks: Tensor, matched: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop each box's matched ground-truth mask [G, H, W] and resample it to [R, size, size].

    As torchvision: RoIAlign with an adaptive sampling grid (sampling_ratio=-1) over the mask
    itself, each box reading only its own matched mask.
    """
    if boxes.numel() == 0:
        return gt_masks.new_zeros((0, size, size), dtype=torch.float32)
    rois = torch.cat([matched[:, None].to(torch.float32), boxes.to(torch.float32)], dim=1)  # [R, 5]
    crops = ops.roi_align_rois(gt_masks.to(torch.float32)[:, None], rois, 1.0, size, -1, False)
    return crops[:, 0]  # [R, size, size]
