"""Backbones (ResNet-50, MobileNetV2) and the feature pyramid on top of them.

Module and parameter names equal torchvision's (`backbone.body.*`, `backbone.fpn.*`), so its
checkpoints load with strict=True. The pyramid always has four levels P2..P5 (strides 4..32)
plus P6 ("pool", a stride-2 max-pool of P5) used only by the RPN.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (torchvision's, for pretrained
    backbones where batches of 1-2 images would make batch statistics useless).

    Unlike torchvision's it keeps a `num_batches_tracked` buffer so its state_dict keys equal
    those of nn.BatchNorm2d: checkpoints saved from either load with strict=True.
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # torchvision's frozen-BN checkpoints carry no counter: accept them as they are.
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        # The same affine map as torchvision's x * scale + shift, through the inference
        # batch-norm kernel: one pass over the activations instead of two.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def conv_norm_act(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    norm: NormLayer | None = None,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (bias only without norm), norm, activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=norm is None)
    ]
    if norm is not None:
        layers.append(norm(out_ch))
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- ResNet-50 (torchvision v1.5)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm: NormLayer):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride on the 3x3: v1.5
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = norm(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), norm(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place, as torchvision: one less full-size activation per block
        return self.relu(out)


class ResNet50Body(nn.Module):
    """ResNet-50 without avgpool/fc; returns the outputs of layer1..layer4 (strides 4..32)."""

    out_channels = (256, 512, 1024, 2048)

    def __init__(self, norm: NormLayer):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        for i, (blocks, width, stride) in enumerate([(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)]):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(in_ch, width, stride if b == 0 else 1, norm))
                in_ch = width * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            outs.append(x)
        return outs

    def freeze(self, trainable_layers: int) -> None:
        """Freeze all but the last `trainable_layers` stages, as torchvision does (0..5)."""
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable_layers}")
        train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            train.append("bn1")
        for name, p in self.named_parameters():
            if not any(name.startswith(t) for t in train):
                p.requires_grad_(False)


# ---------------------------------------------------------------- MobileNetV2 (torchvision)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, norm: NormLayer):
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_norm_act(in_ch, hidden, 1, norm=norm, act=nn.ReLU6))
        layers += [
            conv_norm_act(hidden, hidden, 3, stride, groups=hidden, norm=norm, act=nn.ReLU6),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            norm(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Body(nn.Module):
    """MobileNetV2 `features`; returns the last block of each stride 4, 8, 16, 32."""

    out_channels = (24, 32, 96, 1280)
    return_indices = (3, 6, 13, 18)
    # expand ratio t, channels c, repeats n, first stride s (the MobileNetV2 paper, table 2)
    settings = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
    )

    def __init__(self, norm: NormLayer):
        super().__init__()
        blocks: list[nn.Module] = [conv_norm_act(3, 32, 3, 2, norm=norm, act=nn.ReLU6)]
        in_ch = 32
        for t, c, n, s in self.settings:
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t, norm))
                in_ch = c
        blocks.append(conv_norm_act(in_ch, 1280, 1, norm=norm, act=nn.ReLU6))
        self.features = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.return_indices:
                outs.append(x)
        return outs

    def freeze(self, trainable_layers: int) -> None:
        """Freeze the stem and the earliest stages; `trainable_layers` counts from the top (0..5)."""
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable_layers}")
        stage_starts = (0, 1, 4, 7, 14)  # stem, stride-4, -8, -16, -32 stages
        first_trainable = len(self.features) if trainable_layers == 0 else stage_starts[5 - trainable_layers]
        for i, block in enumerate(self.features):
            if i < first_trainable:
                block.requires_grad_(False)


# ---------------------------------------------------------------- Feature pyramid


class FeaturePyramidNetwork(nn.Module):
    """torchvision's FPN with the LastLevelMaxPool extra block."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: int, norm: NormLayer | None):
        super().__init__()
        self.inner_blocks = nn.ModuleList(conv_norm_act(c, out_channels, 1, norm=norm, act=None) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            conv_norm_act(out_channels, out_channels, 3, norm=norm, act=None) for _ in in_channels
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        """[C2..C5] -> [P2, P3, P4, P5, P6]."""
        last_inner = self.inner_blocks[-1](xs[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(xs) - 2, -1, -1):
            lateral = self.inner_blocks[idx](xs[idx])
            last_inner = add_upsampled(lateral, last_inner)
            results.insert(0, self.layer_blocks[idx](last_inner))
        results.append(F.max_pool2d(results[-1], 1, 2, 0))  # P6 ("pool")
        return results


def add_upsampled(fine: Tensor, coarse: Tensor) -> Tensor:
    """fine + nearest-upsampled coarse, as torchvision's FPN top-down step.

    With the usual exact 2x ratio the upsampled map is never built: a broadcast add over a
    [.., H/2, 2, W/2, 2] view gives the same values and saves a full-size pass (measured
    ~50 ms per level at 800x1344 on CPU). Other ratios take torchvision's interpolate.
    """
    (h, w), (ch, cw) = fine.shape[-2:], coarse.shape[-2:]
    if (h, w) != (2 * ch, 2 * cw):
        return fine + F.interpolate(coarse, size=(h, w), mode="nearest")
    b, c = fine.shape[:2]
    summed = fine.view(b, c, ch, 2, cw, 2) + coarse.view(b, c, ch, 1, cw, 1)  # [B, C, H/2, 2, W/2, 2]
    return summed.view(b, c, h, w)


class BackboneWithFPN(nn.Module):
    def __init__(self, body: ResNet50Body | MobileNetV2Body, out_channels: int, fpn_norm: NormLayer | None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, fpn_norm)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.fpn(self.body(x))
