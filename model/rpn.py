"""Region proposal network: objectness and box deltas per anchor, top-k per level, NMS.

One code path serves eager use, training and the static export graph: proposals are produced
as a padded batch `[B, P, 4]` plus a count per image, so every shape is fixed by the config
and the input size (what TensorRT needs), while eager callers slice off the padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from maskstream.model import ops  # noqa: F401  (registers torch.ops.maskstream.*)
from maskstream.model.anchors import AnchorGenerator
from maskstream.model.backbone import conv_norm_act
from maskstream.model.boxes import BoxCoder, box_iou, clip_boxes, is_large_enough
from maskstream.model.config import RPNConfig
from maskstream.model.matching import Matcher, sample_balanced
from torch import Tensor, nn


class RPNHead(nn.Module):
    """`conv_depth` 3x3 convs shared by all levels, then 1x1 objectness and box-delta layers."""

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        self.conv = nn.Sequential(*(conv_norm_act(in_channels, in_channels, 3) for _ in range(conv_depth)))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)  # type: ignore[arg-type]

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor, list[int]]:
        """Levels -> objectness [B, N], deltas [B, N, 4], anchors per level; N in (level, y, x, a) order."""
        logits, deltas, counts = [], [], []
        for x in features:
            t = self.conv(x)
            o, d = self.cls_logits(t), self.bbox_pred(t)
            b, a, h, w = o.shape
            logits.append(o.permute(0, 2, 3, 1).reshape(b, h * w * a))  # [B, H*W*A]
            deltas.append(d.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, 4))
            counts.append(h * w * a)
        return torch.cat(logits, 1), torch.cat(deltas, 1), counts


class RegionProposalNetwork(nn.Module):
    def __init__(self, cfg: RPNConfig, in_channels: int, conv_depth: int = 1):
        super().__init__()
        self.cfg = cfg
        self.anchor_generator = AnchorGenerator(cfg.anchor_sizes, cfg.aspect_ratios)
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors_per_location, conv_depth)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)

    def forward(
        self, features: list[Tensor], padded_hw: tuple[int, int], image_sizes: Tensor, targets: list[dict] | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """features P2..P6, image_sizes [B, 2] (h, w) of the valid region of each padded image.

        Returns proposals [B, P, 4], num_proposals [B] (rows past the count are padding), losses.
        """
        objectness, deltas, counts = self.head(features)
        anchors = self.anchor_generator(padded_hw, [f.shape[-2:] for f in features], objectness.device)
        pre_n = self.cfg.pre_nms_top_n_train if self.training else self.cfg.pre_nms_top_n_test
        post_n = self.cfg.post_nms_top_n_train if self.training else self.cfg.post_nms_top_n_test

        # Top-k by objectness within each level, so coarse levels are not crowded out.
        top_idx, levels, offset = [], [], 0
        for lvl, level_logits in enumerate(objectness.detach().split(counts, 1)):
            k = min(pre_n, level_logits.shape[1])
            top_idx.append(level_logits.topk(k, dim=1).indices + offset)
            levels.append(torch.full((k,), lvl, dtype=torch.int64, device=objectness.device))
            offset += level_logits.shape[1]
        idx = torch.cat(top_idx, 1)  # [B, T]
        level = torch.cat(levels).expand_as(idx)
        scores = torch.sigmoid(objectness.detach().gather(1, idx))
        boxes = self.box_coder.decode(deltas.detach().gather(1, idx[..., None].expand(-1, -1, 4)), anchors[idx])
        boxes = clip_boxes(boxes[..., 0, :], image_sizes[:, :1], image_sizes[:, 1:])  # [B, T, 4]
        valid = is_large_enough(boxes, self.cfg.min_size) & (scores >= self.cfg.score_thresh)
        scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        keep, num = torch.ops.maskstream.batched_nms_padded(
            boxes, scores, level, self.cfg.nms_thresh, float("-inf"), post_n
        )
        proposals = boxes.gather(1, keep.clamp(min=0)[..., None].expand(-1, -1, 4))  # [B, P, 4]

        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN in training mode needs targets")
            losses = self.loss(objectness, deltas, anchors, targets)
        return proposals, num, losses

    def loss(self, objectness: Tensor, deltas: Tensor, anchors: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """Objectness BCE over sampled anchors + smooth-L1 box loss over the positive ones."""
        labels, regression_targets = [], []
        for target in targets:
            gt = target["boxes"]
            if gt.numel() == 0:
                matched_gt = torch.zeros_like(anchors)
                lab = torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device)
            else:
                matches = self.matcher(box_iou(gt, anchors))
                matched_gt = gt[matches.clamp(min=0)]
                lab = (matches >= 0).to(torch.float32)
                lab[matches == -2] = -1.0  # between thresholds: ignored
            labels.append(lab)
            regression_targets.append(self.box_coder.encode(matched_gt, anchors))
        pos, neg = [], []
        for lab in labels:
            p, n = sample_balanced(lab, self.cfg.batch_size_per_image, self.cfg.positive_fraction)
            pos.append(p)
            neg.append(n)
        pos_mask, neg_mask = torch.stack(pos), torch.stack(neg)  # [B, N]
        sampled = pos_mask | neg_mask
        box_loss = F.smooth_l1_loss(
            deltas[pos_mask], torch.stack(regression_targets)[pos_mask], beta=1 / 9, reduction="sum"
        ) / sampled.sum().clamp(min=1)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], torch.stack(labels)[sampled])
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
