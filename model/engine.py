"""Checkpoint -> TensorRT engine (`NAME.engine`) plus its manifest (`NAME.json`).

    manifest = build_engine("model.pt", config, Path("maskrcnn.engine"), precision="fp16")

The static graph (model/static.py) is exported with torch.export and compiled by torch-tensorrt
into one serialized engine, no partitioning, no torch fallback. The two custom ops convert as:
- `maskstream::multiscale_roi_align` -> the AOT QDP plugin (plugins/roi_align/registration.py),
  added by `_roi_align_converter` below with `add_plugin(..., aot=True)`;
- `maskstream::batched_nms_padded` -> TensorRT's native INMSLayer (`_nms_converter` below).

Precision. TensorRT 11 networks are strongly typed only (no BuilderFlag.FP16), and torch-tensorrt
compiles with explicit typing (default from 2.10; `enabled_precisions` is gone in 2.13), so the
precision is what the graph's dtypes say. "fp16" casts in the graph (model.static.with_precision):
the backbone + FPN (most of the FLOPs) run in float16 and their features are cast back to float32,
so the RPN, the box head, NMS and RoIAlign stay float32 (an fp16 box coordinate near 1000 px is
only good to 0.5 px); the mask head + predictor run in float16 from the RoIAligned features, the
logits of each box's own class cast back to float32 before the sigmoid.

TensorRT is imported lazily: without it this module still imports and `build_engine` raises
`TensorRTUnavailable` (plugins/tensorrt_env.py, which detects TensorRT) saying what to install.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from maskstream.configs import codec
from maskstream.model.checkpoint import file_sha256
from maskstream.model.coco import class_names
from maskstream.model.config import ModelConfig
from maskstream.model.static import PRECISIONS, Precision, with_precision
from maskstream.plugins.roi_align.registration import PLUGIN_ID, plugin_version, register_plugin
from maskstream.plugins.tensorrt_env import INSTALL_HINT, TensorRTUnavailable, tensorrt_version

__all__ = [
    "EngineManifest",
    "EngineMismatch",
    "ManifestError",
    "Precision",
    "build_engine",
    "manifest_path",
]

NMS_OP = "maskstream::batched_nms_padded"


class ManifestError(ValueError):
    """An engine manifest that cannot be read: missing file, bad JSON, unknown or missing keys, wrong types."""


class EngineMismatch(ValueError):
    """An engine whose manifest does not match what this process expects."""


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class EngineManifest:
    """What an engine was built from and for; written as JSON beside the engine."""

    input_shape: tuple[int, int, int, int]  # images [B, 3, H, W]
    input_dtype: str  # "uint8"
    image_sizes_shape: tuple[int, int]  # [B, 2] (h, w)
    image_sizes_dtype: str  # "int64"
    input_bindings: tuple[str, str]  # engine tensor names of images, image_sizes
    output_bindings: tuple[str, ...]  # engine tensor names of model.static.OUTPUT_NAMES, same order
    precision: Precision
    detections: int  # K
    num_classes: int  # including background
    class_names: tuple[str, ...]
    image_mean: tuple[float, float, float]  # normalisation inside the graph, on [0, 1] pixels
    image_std: tuple[float, float, float]
    tensorrt_version: str
    torch_tensorrt_version: str
    plugin_version: int  # plugins/roi_align/spec.json "version"
    checkpoint_sha256: str
    config: dict[str, Any]  # the ModelConfig, as a plain dict

    def __post_init__(self) -> None:
        # Built in code (build_engine) as well as read: either way what is written must read back.
        try:
            codec.check(self)
        except codec.CodecError as exc:
            raise ManifestError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = codec.to_plain(self)
        return plain

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> EngineManifest:
        """The manifest of JSON data; every key required, none unknown, types as declared."""
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
        try:
            return codec.from_plain(cls, data)
        except codec.CodecError as exc:
            raise ManifestError(f"{source}: {exc}") from None

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> EngineManifest:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read the engine manifest ({exc.strerror or exc})") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))


def manifest_path(engine_path: str | Path) -> Path:
    """`NAME.engine` -> `NAME.json`."""
    return Path(engine_path).with_suffix(".json")


# ----------------------------------------------------------------------------- availability


def _require_toolchain() -> tuple[str, str]:
    trt_version = tensorrt_version()
    if trt_version is None:
        raise TensorRTUnavailable(f"build-engine needs TensorRT, which is not installed: {INSTALL_HINT}")
    try:
        import torch_tensorrt
    except Exception as exc:
        raise TensorRTUnavailable(
            f"build-engine needs torch-tensorrt, which does not import ({type(exc).__name__}: {exc}): {INSTALL_HINT}"
        ) from exc
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("build-engine needs a CUDA device (TensorRT builds for the GPU it runs on)")
    return trt_version, str(torch_tensorrt.__version__)


# ----------------------------------------------------------------------------- converters

_converters_registered = False


def _register_converters() -> None:
    """Register our two ops' converters with torch-tensorrt, once per process."""
    global _converters_registered
    if _converters_registered:
        return
    import maskstream.model.ops  # noqa: F401  (registers torch.ops.maskstream.*)
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter

    register_plugin()
    dynamo_tensorrt_converter(torch.ops.maskstream.multiscale_roi_align.default)(_roi_align_converter)
    dynamo_tensorrt_converter(torch.ops.maskstream.batched_nms_padded.default, supports_dynamic_shapes=False)(
        _nms_converter
    )
    _converters_registered = True


def op_arguments(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A graph node's arguments by name, in schema order, defaults filled in: torch.export leaves
    out trailing arguments equal to their defaults (`multiscale_roi_align(p2, .., boxes, 7)`)."""
    schema = target._schema.arguments
    given = {**dict(zip((a.name for a in schema), args)), **kwargs}
    values = {}
    for a in schema:
        if a.name in given:
            values[a.name] = given[a.name]
        elif a.has_default_value():
            values[a.name] = a.default_value
        else:
            raise ValueError(f"{target}: the graph gives no value for argument {a.name}")
    return values


def _roi_align_converter(ctx: Any, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
    """`multiscale_roi_align` -> the plugin's AOT implementation, the PTX baked into the engine.

    Not torch-tensorrt's `generate_plugin_converter`: it passes the schema's defaulted attributes
    first and the node's positional ones after them, so `output_size` (required) would come last,
    and `tensorrt.plugin` refuses attributes out of registration order ("Unexpected schema",
    `PluginDef.__call__` in tensorrt/plugin/_lib.py).
    """
    import tensorrt.plugin as trtp
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

    values = op_arguments(target, args, kwargs)
    namespace, op_name = PLUGIN_ID.split("::")
    plugin = getattr(getattr(trtp.op, namespace), op_name)
    tensors = [get_trt_tensor(ctx, values[n], f"{name}_{n}") for n in plugin.input_tensor_names]
    # Registration order and the registered types (QDP checks `type(value) is annotation`).
    attrs = {n: kind(values[n]) for n, kind in plugin.input_attrs.items()}
    layer = ctx.net.add_plugin(plugin(*tensors, **attrs), aot=True)
    layer.name = name
    return layer.get_output(0)


def nms_score_threshold(value: float) -> float:
    """The op's score threshold as INMSLayer gets it: -inf becomes the lowest finite float32.

    Both keep `score > threshold`; for every float32 score but -3.4028235e38 itself the answer is
    the same, and TensorRT is not asked to take an infinite threshold (its documentation does not
    say that it does). NaN is refused: it would keep nothing in the op, and TensorRT's rule is unknown."""
    if math.isnan(value):
        raise ValueError(f"{NMS_OP}: the score threshold is NaN")
    return float(np.finfo(np.float32).min) if value == -math.inf else value


def _nms_converter(ctx: Any, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> tuple[Any, Any]:
    """`batched_nms_padded(boxes [B,N,4], scores [B,N], classes [B,N], iou, score_thr, max_out)` on INMSLayer.

    Per class by the coordinate-offset trick: each box is shifted by `class * span`, with `span` the
    extent of all boxes + 1, so boxes of different classes never overlap and one NMS "class" does
    exact per-class suppression. One INMSLayer per image (B is static), max_out boxes per class;
    the data-dependent `[M, 3]` selection is padded with -1 and sliced to a static `[max_out]`.

    Where TensorRT's NMS differs from the op (what a GPU run must check against the torch op):
    - candidates: TensorRT keeps `score > score_threshold` (strict, float32), the op's rule too. The
      RPN passes -inf (keep every box but those scored -inf, the invalid ones); how TensorRT takes an
      infinite threshold is not documented, so it gets the lowest finite float32 instead
      (`nms_score_threshold`), the same rule for every score but exactly -3.4e38. How it treats
      NaN scores is not documented either;
    - suppression: both drop a box whose IoU with a kept box is `> iou_threshold` (TensorRT keeps
      `IoU <= threshold`); the IoU arithmetic may differ in the last ulp, and the offset adds
      rounding (float32 ulp 1/128 px at class 90 of a 1344 px image), so IoUs equal to the
      threshold within ~1e-4 may flip;
    - ties: the op orders equal scores by lower index (stable); TensorRT's order for equal scores
      is unspecified, both in suppression and in the output;
    - TopK: TensorRT considers only the `topk_box_limit` (5000) best candidates per image; the
      output then differs only if fewer than max_out boxes survive among them (greedy NMS of the
      first 5000 candidates is exactly the op's on them). The RPN has <= 5 levels x 1000 and fits;
      the box head (1000 x 90 pairs) exceeds it only with more than 5000 scores above 0.05;
    - boxes must be finite: a NaN or infinite coordinate poisons the span (the op lets such a box
      suppress nothing); the model clips every box, so it never has one.
    """
    import tensorrt as trt
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

    boxes, scores, classes = (get_trt_tensor(ctx, a, f"{name}_{n}") for a, n in zip(args[:3], ("boxes", "scores", "c")))
    iou_threshold, score_threshold, max_output = float(args[3]), float(args[4]), int(args[5])
    if max_output < 1:
        raise ValueError(f"{NMS_OP}: max_output must be >= 1 in an engine, got {max_output}")
    net: trt.INetworkDefinition = ctx.net
    b, n = int(boxes.shape[0]), int(boxes.shape[1])

    def constant(value: Any, dtype: Any, label: str) -> trt.ITensor:
        return get_trt_tensor(ctx, np.asarray(value, dtype=dtype).reshape(-1), f"{name}_{label}")

    def scalar(value: Any, dtype: Any, label: str) -> trt.ITensor:  # 0-d, as INMSLayer and gather want
        return reshape(constant([value], dtype, label), [])

    def reshape(t: trt.ITensor, dims: list[int]) -> trt.ITensor:
        layer = net.add_shuffle(t)
        layer.reshape_dims = trt.Dims(dims)
        return layer.get_output(0)

    def cast(t: trt.ITensor, dtype: trt.DataType) -> trt.ITensor:
        return net.add_cast(t, dtype).get_output(0)

    def binary(x: trt.ITensor, y: trt.ITensor, op: trt.ElementWiseOperation) -> trt.ITensor:
        return net.add_elementwise(x, y, op).get_output(0)

    boxes, scores = cast(boxes, trt.float32), cast(scores, trt.float32)  # INMSLayer: one float type
    all_axes = (1 << 0) | (1 << 1) | (1 << 2)
    low = net.add_reduce(boxes, trt.ReduceOperation.MIN, all_axes, True).get_output(0)  # [1, 1, 1]
    high = net.add_reduce(boxes, trt.ReduceOperation.MAX, all_axes, True).get_output(0)
    one = reshape(constant([1.0], np.float32, "one"), [1, 1, 1])
    span = binary(binary(high, low, trt.ElementWiseOperation.SUB), one, trt.ElementWiseOperation.SUM)
    offset = binary(reshape(cast(classes, trt.float32), [b, n, 1]), span, trt.ElementWiseOperation.PROD)  # [B, N, 1]
    shifted = binary(binary(boxes, low, trt.ElementWiseOperation.SUB), offset, trt.ElementWiseOperation.SUM)
    scores = reshape(scores, [b, n, 1])  # [B, N, 1]: one NMS class

    max_per_class = scalar(max_output, np.int32, "max_output")
    iou = scalar(iou_threshold, np.float32, "iou")
    threshold = scalar(nms_score_threshold(score_threshold), np.float32, "score_threshold")
    box_column = scalar(2, np.int32, "box_column")
    padding = constant(np.full(max_output, -1), np.int32, "padding")
    rows, counts = [], []
    unit = trt.Dims([1, 1, 1])
    for i in range(b):
        image_boxes = net.add_slice(shifted, trt.Dims([i, 0, 0]), trt.Dims([1, n, 4]), unit).get_output(0)  # [1, N, 4]
        image_scores = net.add_slice(scores, trt.Dims([i, 0, 0]), trt.Dims([1, n, 1]), unit).get_output(0)  # [1, N, 1]
        nms = net.add_nms(image_boxes, image_scores, max_per_class)
        nms.set_input(3, iou)
        nms.set_input(4, threshold)
        nms.name = f"{name}_nms_{i}"
        selected = nms.get_output(0)  # [M, 3] (batch, class, box), descending score; M <= max_output
        kept = net.add_gather(selected, box_column, 1).get_output(0)  # [M]
        padded = net.add_concatenation([kept, padding])  # [M + max_output]
        padded.axis = 0
        row = net.add_slice(padded.get_output(0), trt.Dims([0]), trt.Dims([max_output]), trt.Dims([1])).get_output(0)
        rows.append(reshape(row, [1, max_output]))
        counts.append(reshape(nms.get_output(1), [1]))
    keep = net.add_concatenation(rows)  # [B, max_output]
    keep.axis = 0
    num = net.add_concatenation(counts)  # [B]
    num.axis = 0
    return cast(keep.get_output(0), trt.int64), cast(num.get_output(0), trt.int64)


# ----------------------------------------------------------------------------- build


def prepare_static(checkpoint: str | Path | None, config: ModelConfig, precision: Precision) -> Any:
    """The StaticMaskRCNN to compile, in eval mode, with the precision's casts in the graph."""
    from maskstream.model.mask_rcnn import build
    from maskstream.model.static import StaticMaskRCNN

    return StaticMaskRCNN(with_precision(build(config=config, checkpoint=checkpoint).eval(), precision)).eval()


def build_engine(
    checkpoint: str | Path, config: ModelConfig, out: str | Path, precision: Precision = "fp32"
) -> EngineManifest:
    """Compile the static graph of `checkpoint` into `out` (NAME.engine) and write NAME.json beside it."""
    from maskstream.model.static import OUTPUT_NAMES, export

    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    trt_version, tt_version = _require_toolchain()
    import tensorrt as trt
    import torch_tensorrt

    out = Path(out)
    static = prepare_static(checkpoint, config, precision).to("cuda")
    program = export(static, "cuda")
    _register_converters()
    blob = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
        program, arg_inputs=list(static.example_inputs("cuda")), min_block_size=1
    )
    engine_bytes = bytes(blob)

    # Binding names as the engine has them: torch-tensorrt names inputs after the graph's
    # placeholders (images, image_sizes) and, before 2.14, output i of the graph `output{i}`.
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_bytes)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [t for t in names if engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT]
    outputs = [t for t in names if engine.get_tensor_mode(t) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 2 or len(outputs) != len(OUTPUT_NAMES):
        raise RuntimeError(f"engine has inputs {inputs} and outputs {outputs}; expected 2 and {len(OUTPUT_NAMES)}")
    if set(inputs) == {"images", "image_sizes"}:
        inputs = ["images", "image_sizes"]
    if set(outputs) == {f"output{i}" for i in range(len(OUTPUT_NAMES))}:
        outputs = [f"output{i}" for i in range(len(OUTPUT_NAMES))]

    b, _, h, w = static.shape
    manifest = EngineManifest(
        input_shape=(b, 3, h, w),
        input_dtype="uint8",
        image_sizes_shape=(b, 2),
        image_sizes_dtype="int64",
        input_bindings=(inputs[0], inputs[1]),
        output_bindings=tuple(outputs),
        precision=precision,
        detections=config.static.detections,
        num_classes=config.num_classes,
        class_names=class_names(config.num_classes, config.class_names),
        image_mean=config.transform.image_mean,
        image_std=config.transform.image_std,
        tensorrt_version=trt_version,
        torch_tensorrt_version=tt_version,
        plugin_version=plugin_version(),
        checkpoint_sha256=file_sha256(checkpoint),
        config=codec.to_plain(config),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(engine_bytes)
    manifest.write(manifest_path(out))
    return manifest
