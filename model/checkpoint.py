"""Loading weights with errors that name what does not fit."""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from maskstream.model.config import ModelConfig, Variant, default_config
from torch import nn

MAX_LISTED = 8


class CheckpointError(ValueError):
    pass


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def read_state_dict(source: str | Path | dict) -> dict[str, torch.Tensor]:
    """A state dict from a file (raw, or wrapped under 'model'/'state_dict') or a dict."""
    if isinstance(source, dict):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or not a torch file
            raise CheckpointError(f"checkpoint {path}: cannot be read as a torch state dict ({exc})") from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {source}: expected a dict of parameter name -> tensor")
    return state


def _problems(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    # torchvision's frozen-BN checkpoints have no counters; the module fills them in.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} keys with the wrong shape: {_listing(wrong)}")
    return problems


def check_fits(module: nn.Module, source: str | Path | dict, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, once it is known to fit `module` key for key and shape for
    shape; else CheckpointError reporting every mismatch at once: missing, unexpected, wrong shape."""
    state = read_state_dict(source)
    problems = _problems(module.state_dict(), state)
    if problems:
        name = source if not isinstance(source, dict) else "state dict"
        raise CheckpointError(f"{what} {name} does not fit the model: " + "; ".join(problems))
    return state


def load_weights(module: nn.Module, source: str | Path | dict, what: str = "checkpoint") -> None:
    """Strict load that reports every mismatch at once: missing, unexpected, wrong shape."""
    state = check_fits(module, source, what)
    own = module.state_dict()
    # Weights stored in another float precision (the bundled model is saved as fp16 to halve
    # its size) take the model's own dtype here, explicitly rather than by copy_'s casting.
    state = {
        k: v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v for k, v in state.items()
    }
    module.load_state_dict(state, strict=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# One key that only each variant's checkpoints have (torchvision's names, which ours share).
_VARIANT_KEYS: tuple[tuple[Variant, str], ...] = (
    ("lite", "backbone.body.features.0.0.weight"),  # MobileNetV2 body
    ("v2", "roi_heads.box_head.0.0.weight"),  # 4 conv + 1 FC box head
    ("v1", "roi_heads.box_head.fc6.weight"),  # 2 FC box head
)
_CLASSES_KEY = "roi_heads.box_predictor.cls_score.weight"  # [num_classes, representation]
_FPN_KEY = "backbone.fpn.inner_blocks.0.0.weight"  # [fpn_channels, C, 1, 1]
_MASK_KEY = "roi_heads.mask_predictor.mask_fcn_logits.weight"


def identify(state: Mapping[str, Any], source: str | Path = "state dict") -> ModelConfig:
    """The model config a checkpoint was made for, read from its keys and shapes: the variant,
    the number of classes and the widths that vary between our configs. What weights cannot say
    (input size, anchors, thresholds) is the variant's default: a config file says otherwise."""
    variant = next((v for v, key in _VARIANT_KEYS if key in state), None)
    if variant is None or _CLASSES_KEY not in state or _FPN_KEY not in state or _MASK_KEY not in state:
        raise CheckpointError(_not_a_mask_rcnn(state, source))
    classes, representation = (int(n) for n in state[_CLASSES_KEY].shape)
    return dataclasses.replace(default_config(variant), num_classes=classes, box_representation=representation,
                               fpn_channels=int(state[_FPN_KEY].shape[0]))


def _not_a_mask_rcnn(state: Mapping[str, Any], source: str | Path) -> str:
    keys = list(state)
    if any(key.startswith("roi_heads.box_predictor") for key in keys) and _MASK_KEY not in state:
        looks = "a detector without a mask head (Faster R-CNN?)"
    elif "fc.weight" in state or "classifier.1.weight" in state:
        looks = "an image classifier (it has a classification layer and no detection heads)"
    elif not keys:
        looks = "empty"
    else:
        looks = "no Mask R-CNN this project knows"
    return (f"checkpoint {source}: {len(keys)} tensors, {looks}; expected torchvision's maskrcnn_resnet50_fpn "
            f"(v1: {_VARIANT_KEYS[2][1]!r}), maskrcnn_resnet50_fpn_v2 ({_VARIANT_KEYS[1][1]!r}) or the lite variant "
            f"({_VARIANT_KEYS[0][1]!r}), each with {_CLASSES_KEY!r} and {_MASK_KEY!r}; first keys: {_listing(keys)}")
