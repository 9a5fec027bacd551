"""The inference contract: what preprocess, the runner and postprocess must agree on.

    contract = InferenceContract.from_model_config(model_cfg)       # the torch runner
    contract = InferenceContract.from_manifest(EngineManifest.read(...))  # a TensorRT engine
    contract.input_shape      # (B, 3, H, W): preprocess pads every frame to (H, W)
    contract.pad_rgb          # uint8 RGB that normalises to ~0: the pad colour
    contract.class_names      # postprocess names labels with these

One object, decided once at start (pipeline.run_config.plan) and handed to every stage that
depends on it, so that an engine built for another shape, K or class list is refused before the
first frame instead of failing on every frame. Torch-free: the preprocess and postprocess
processes unpickle it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from maskstream.model.coco import class_names as label_names

if TYPE_CHECKING:
    from maskstream.model.config import ModelConfig
    from maskstream.model.engine import EngineManifest

__all__ = ["PRECISIONS", "ContractMismatch", "InferenceContract", "Precision", "pad_rgb"]

# What runs in float16 in the static graph (model.static.with_precision).
Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


class ContractMismatch(ValueError):
    """Two parts of a run that disagree about the inference contract."""


def pad_rgb(image_mean: tuple[float, ...]) -> tuple[int, int, int]:
    """uint8 RGB that normalises to (about) zero with `image_mean` (on [0, 1] pixels): padding
    with it matches the eager path's zero padding after normalisation."""
    red, green, blue = (round(m * 255) for m in image_mean)
    return red, green, blue


@dataclass(frozen=True)
class InferenceContract:
    batch: int
    height: int
    width: int
    detections: int  # K: rows per image in every output, num_detections of them filled
    class_names: tuple[str, ...]  # index = label
    image_mean: tuple[float, float, float]  # normalisation inside the graph, on [0, 1] pixels
    image_std: tuple[float, float, float]
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        for name in ("batch", "height", "width", "detections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not self.class_names:
            raise ValueError("class_names: expected at least one name (index 0 is the background)")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name}: expected 3 values (R, G, B), got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return self.batch, 3, self.height, self.width

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def pad_rgb(self) -> tuple[int, int, int]:
        return pad_rgb(self.image_mean)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, precision: Precision = "fp32") -> InferenceContract:
        """What the static graph of `cfg` takes and gives (the torch runner builds it from cfg)."""
        static = cfg.static
        return cls(static.batch, static.height, static.width, static.detections,
                   label_names(cfg.num_classes, cfg.class_names), cfg.transform.image_mean, cfg.transform.image_std,
                   precision)

    @classmethod
    def from_manifest(cls, manifest: EngineManifest) -> InferenceContract:
        """What an engine was built for, as its manifest says."""
        batch, _, height, width = manifest.input_shape
        return cls(batch, height, width, manifest.detections, manifest.class_names, manifest.image_mean,
                   manifest.image_std, manifest.precision)

    def check(self, found: InferenceContract, source: str, expected_from: str, only: tuple[str, ...] = (),
              ignore: tuple[str, ...] = ()) -> None:
        """Raise ContractMismatch naming the first field where `found` (what `source` has) differs
        from this contract (what `expected_from` says); `only`/`ignore` restrict the fields."""
        for f in dataclasses.fields(self):
            if (only and f.name not in only) or f.name in ignore:
                continue
            want, got = getattr(self, f.name), getattr(found, f.name)
            if want != got:
                raise ContractMismatch(f"{source}: {f.name} does not match {expected_from}: {_difference(want, got)}")


def _difference(want: Any, got: Any) -> str:
    if isinstance(want, tuple) and isinstance(got, tuple) and max(len(want), len(got)) > 4:  # class names: say where
        if len(want) != len(got):
            return f"expected {len(want)} entries, found {len(got)}"
        i = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
        return f"entry {i}: expected {want[i]!r}, found {got[i]!r}"
    return f"expected {want!r}, found {got!r}"
