"""Loading weights with errors that name what does not fit."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
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


def load_weights(module: nn.Module, source: str | Path | dict, what: str = "checkpoint") -> None:
    """Strict load that reports every mismatch at once: missing, unexpected, wrong shape."""
    state = read_state_dict(source)
    own = module.state_dict()
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
    if problems:
        name = source if not isinstance(source, dict) else "state dict"
        raise CheckpointError(f"{what} {name} does not fit the model: " + "; ".join(problems))
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
