"""Runners: one way to run the static graph, whatever runs it.

    runner = make_runner(RunnerSpec(engine=Path("maskrcnn.engine")))   # chosen once, at start
    out = runner.infer(images, image_sizes)    # uint8 [B, 3, H, W], int [B, 2] (h, w)
    out["boxes"]                               # float32 [B, K, 4]; keys = model.static.OUTPUT_NAMES
    batch = runner.submit(images, image_sizes) # the same, started: on CUDA it returns at once,
    out = batch.result()                       # and result() waits for the device

Every runner returns the same fixed-shape arrays: num_detections int64 [B], boxes float32 [B, K, 4],
scores float32 [B, K], labels int64 [B, K], mask_probs float32 [B, K, 28, 28]; rows past
num_detections are zero.
- `TorchRunner`: `StaticMaskRCNN` on CPU or CUDA. On CUDA it captures the fixed-shape forward in
  a CUDA graph on the first call and replays it after, when the graph can be captured (every op
  on the device, no host synchronisation); otherwise it runs eagerly and says why in `graph_error`.
- `TensorRTRunner`: a TensorRT engine file, refused unless its manifest (NAME.json) matches.

Each runner says what it takes and gives as a `model.contract.InferenceContract` (`runner.contract`);
the inference stage refuses a runner whose contract is not the one the run was planned with.
Process-wide torch settings (TF32) are the process entry point's: `configure_process`.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from maskstream.model.config import ModelConfig
from maskstream.model.contract import InferenceContract, Precision
from maskstream.model.engine import EngineManifest, EngineMismatch, manifest_path
from maskstream.model.fuse import fold_batch_norms
from maskstream.model.mask_rcnn import MaskRCNN, build
from maskstream.model.static import OUTPUT_NAMES, HalfBackbone, StaticMaskRCNN, with_precision
from maskstream.plugins.roi_align.registration import plugin_version
from maskstream.plugins.tensorrt_env import INSTALL_HINT, TensorRTUnavailable, tensorrt_version

__all__ = [
    "OUTPUT_DTYPES",
    "Completed",
    "PendingBatch",
    "Runner",
    "RunnerSpec",
    "TensorRTRunner",
    "TorchRunner",
    "check_inputs",
    "check_sizes",
    "check_manifest",
    "configure_process",
    "engine_manifest",
    "make_runner",
    "runner_choice",
]

log = logging.getLogger("maskstream.runners")

OUTPUT_DTYPES: dict[str, type[np.generic]] = {
    "num_detections": np.int64,
    "boxes": np.float32,
    "scores": np.float32,
    "labels": np.int64,
    "mask_probs": np.float32,
}


class PendingBatch(Protocol):
    """A batch given to `Runner.submit`: `result()` waits for it and returns its outputs;
    `tensors()` gives them as torch tensors where the runner made them (on its device), for work
    that goes on there (model.mask_crops) in the device's own order, without waiting."""

    def result(self) -> dict[str, np.ndarray]: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Completed:
    """A batch that ran to the end inside `submit` (CPU, TensorRT): its outputs, the caller's own."""

    outputs: dict[str, np.ndarray]

    def result(self) -> dict[str, np.ndarray]:
        return self.outputs

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(array) for name, array in self.outputs.items()}


class _OnDevice:
    """A batch queued on a CUDA stream, its outputs copied into page-locked arrays behind it."""

    def __init__(self, outputs: dict[str, np.ndarray], done: torch.cuda.Event, on_device: dict[str, torch.Tensor]):
        self._outputs, self._done, self._on_device = outputs, done, on_device

    def result(self) -> dict[str, np.ndarray]:
        self._done.synchronize()
        return self._outputs

    def tensors(self) -> dict[str, torch.Tensor]:
        return self._on_device


class Runner(Protocol):
    input_shape: tuple[int, int, int, int]
    contract: InferenceContract  # what it takes and gives: shape, K, classes, normalisation, precision
    # Whether submit() returns before the batch has run (a CUDA stream), so a caller gains by
    # filling the next batch before it waits; False: submit() runs the batch to the end.
    asynchronous: bool
    # Why the runner runs slower than it could (uncompiled, no CUDA graph): None when it does not.
    compile_error: str | None
    graph_error: str | None

    def infer(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]: ...

    def submit(self, images: np.ndarray, image_sizes: np.ndarray) -> PendingBatch: ...

    def input_buffer(self) -> np.ndarray: ...


class HostBatch:
    """The uint8 [B, 3, H, W] batch a caller fills in place and passes to `infer` (the inference
    stage does). For a GPU runner it is page-locked, so the copy to the device is one direct DMA
    that can run asynchronously, instead of a copy staged through a driver buffer; any other
    array passed to `infer` still works, through the slower path."""

    def __init__(self, shape: tuple[int, int, int, int], pinned: bool):
        self.tensor = torch.zeros(shape, dtype=torch.uint8, pin_memory=pinned)
        self.array: np.ndarray = self.tensor.numpy()

    def holds(self, images: np.ndarray) -> bool:
        """Whether `images` is this buffer (the caller filled it in place)."""
        return images.__array_interface__["data"][0] == self.tensor.data_ptr() and images.shape == self.array.shape

    def as_tensor(self, images: np.ndarray) -> torch.Tensor:
        """`images` as a CPU tensor: the page-locked one itself when the caller filled this buffer."""
        return self.tensor if self.holds(images) else torch.from_numpy(images)


def check_inputs(images: Any, image_sizes: Any, shape: tuple[int, int, int, int]) -> None:
    """Raise a clear error unless images is uint8 `shape` and image_sizes int [B, 2] within (H, W)."""
    b, _, h, w = shape
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images: expected a numpy array uint8 {list(shape)}, got {type(images).__name__}")
    if images.dtype != np.uint8 or images.shape != shape:
        raise ValueError(f"images: expected uint8 {list(shape)} (B, 3, H, W), got {images.dtype} {list(images.shape)}")
    check_sizes(image_sizes, shape)


def check_sizes(image_sizes: Any, shape: tuple[int, int, int, int]) -> None:
    """Raise a clear error unless image_sizes is int [B, 2] within the (H, W) of `shape`."""
    b, _, h, w = shape
    if not isinstance(image_sizes, np.ndarray):
        raise TypeError(f"image_sizes: expected a numpy integer array [{b}, 2], got {type(image_sizes).__name__}")
    if not np.issubdtype(image_sizes.dtype, np.integer) or image_sizes.shape != (b, 2):
        raise ValueError(
            f"image_sizes: expected integer [{b}, 2] (h, w per frame), "
            f"got {image_sizes.dtype} {list(image_sizes.shape)}"
        )
    hs, ws = image_sizes[:, 0], image_sizes[:, 1]
    if (hs < 1).any() or (hs > h).any() or (ws < 1).any() or (ws > w).any():
        raise ValueError(f"image_sizes: every (h, w) must be within 1..{h} x 1..{w}, got {image_sizes.tolist()}")


_TORCH_OUTPUT_DTYPES = {name: torch.from_numpy(np.empty(0, dtype)).dtype for name, dtype in OUTPUT_DTYPES.items()}


def _to_numpy(outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: outputs[name].detach().cpu().numpy().astype(OUTPUT_DTYPES[name], copy=True) for name in OUTPUT_NAMES}


# ----------------------------------------------------------------------------- torch


def configure_process(tf32: bool = True) -> None:
    """torch's process-wide settings a CUDA TorchRunner is made for; call once in the process's
    entry point (the inference stage's `main`), before making the runner: torch reads them when the
    forward is compiled and captured, and eager calls read them on every call.

    tf32: float32 matrix products and convolutions may round their inputs to TF32 on tensor cores
    (Ampere and later), as a TensorRT engine's float32 layers do by default (BuilderFlag.TF32).
    torch's own defaults allow it for convolutions but not for matrix products, which would leave
    the box head's fully connected layers on the slower float32 units. False keeps both in float32."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def _process_tf32() -> bool | None:
    """Whether this process runs float32 products in TF32 (both flags), False if in neither, None if mixed."""
    flags = {torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32}
    return flags.pop() if len(flags) == 1 else None


class TorchRunner:
    """`StaticMaskRCNN` on "cpu" or "cuda" (CUDA graph replay on CUDA when capturable), its
    convolutions channels_last on CPU.

    precision "fp16" runs the backbone + FPN and the mask head + predictor in float16
    (`model.static.with_precision`, the same casts as an fp16 engine); it applies to a MaskRCNN, a
    StaticMaskRCNN keeps the casts it has.

    compile: the forward through torch.compile (inductor, whole graph, static shapes) before the
    CUDA graph is captured. Inductor fuses what eager torch runs as separate passes over each
    activation: a convolution's bias add, its ReLU and the residual add become one kernel, and the
    fp16 casts ride along. The compile on the first call takes long (inductor caches it on disk
    for the next start), which a GPU's faster forward repays and a small CPU's does not (see
    benchmarks/results and the README for the figures). Outputs equal up to float rounding (which
    may swap detections whose scores tie).

    tf32 (CUDA): whether float32 products may run in TF32 (see `configure_process`). The flags are
    torch's, process-wide, so the runner does not set them: it is refused unless the process has
    them as asked (configure_process(tf32) first)."""

    def __init__(self, model: MaskRCNN | StaticMaskRCNN, device: str = "cpu", cuda_graph: bool = True,
                 precision: Precision = "fp32", channels_last: bool | None = None, tf32: bool = True,
                 compile: bool = False):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' asked for, but torch has no CUDA device")
        if isinstance(model, StaticMaskRCNN) and precision != "fp32":
            raise ValueError("precision: applies to a MaskRCNN; this StaticMaskRCNN already has its casts")
        if device == "cuda" and _process_tf32() is not tf32:
            raise ValueError(
                f"tf32: {tf32} asked for, but this process has torch.backends.cuda.matmul.allow_tf32="
                f"{torch.backends.cuda.matmul.allow_tf32} and torch.backends.cudnn.allow_tf32="
                f"{torch.backends.cudnn.allow_tf32}: call model.runners.configure_process(tf32={tf32}) "
                "in the process's entry point first (process-wide flags, which no constructor sets)")
        # Norm layers folded into the convs (same outputs, one pass less per activation), in
        # float32 before any cast to float16, so each merged weight rounds once.
        static = model if isinstance(model, StaticMaskRCNN) else StaticMaskRCNN(
            with_precision(fold_batch_norms(model), precision))
        self.static = static.eval().to(device)
        # What the graph runs, also for a StaticMaskRCNN handed in with its casts already applied.
        self.precision: Precision = "fp16" if isinstance(static.model.backbone, HalfBackbone) else "fp32"
        # Convolutions in NHWC (channels_last): oneDNN's native layout, faster on a CPU with the same
        # outputs up to rounding (benchmarks/bench_memory_format.py measures it). None: on for CPU;
        # CUDA keeps NCHW: the eager graph gains little there, and the compiled graph (the CUDA
        # default) has inductor choose its layouts itself.
        self.channels_last = device == "cpu" if channels_last is None else channels_last
        if self.channels_last:
            # Module.to takes memory_format (4-D weights only), which torch's type stubs leave out.
            self.static = self.static.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.device = device
        cuda = device == "cuda"
        self.asynchronous = cuda
        self.compiled = compile
        self.compile_error: str | None = None  # why the forward runs uncompiled after all
        # What the runner calls: the module itself, or inductor's compilation of it, compiled on
        # the first call (inside the warm-up, before any CUDA graph capture).
        self._forward: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] = (
            self._first_compiled_call if compile else self.static)
        self.tf32 = cuda and tf32
        self.input_shape: tuple[int, int, int, int] = static.shape  # type: ignore[assignment]
        b, _, h, w = self.input_shape
        self.contract = dataclasses.replace(InferenceContract.from_model_config(static.model.cfg, self.precision),
                                            batch=b, height=h, width=w,
                                            detections=static.model.roi_heads.detections_per_img)
        # The batches callers fill in place (input_buffer()). On CUDA two, page-locked, taken in
        # turn by `submit`: one fills while the other is copied in and run. Outputs likewise.
        self._hosts = [HostBatch(self.input_shape, pinned=cuda) for _ in range(2 if cuda else 1)]
        self._host_sizes = [torch.zeros((self.input_shape[0], 2), dtype=torch.int64, pin_memory=cuda)
                            for _ in self._hosts]
        self._host_outputs: list[dict[str, torch.Tensor] | None] = [None] * len(self._hosts)
        self._devices: list[torch.Tensor | None] = [None] * len(self._hosts)  # device_buffer()'s
        self._slot = 0  # the batch input_buffer() hands out
        self.graph_error: str | None = None  # why CUDA graphs are not used, once tried
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: tuple[torch.Tensor, torch.Tensor] | None = None
        self._static_out: dict[str, torch.Tensor] | None = None
        # Chosen once: CPU runs eagerly; CUDA decides on the first call (capture or eager).
        self._run: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] = (
            self._first_cuda_call if cuda and cuda_graph else self._eager
        )

    def input_buffer(self) -> np.ndarray:
        return self._hosts[self._slot].array

    def device_buffer(self) -> torch.Tensor:
        """The batch to fill in place on the runner's device (uint8 [B, 3, H, W]) for
        `submit_device`: what a preprocess on the device writes into. Two on CUDA, taken in turn
        like the host batches."""
        if self._devices[self._slot] is None:  # allocated on first use: most callers fill host batches
            self._devices[self._slot] = torch.zeros(self.input_shape, dtype=torch.uint8, device=self.device)
        batch = self._devices[self._slot]
        assert batch is not None
        return batch

    def infer(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        check_inputs(images, image_sizes, self.input_shape)
        # Copies to the device may be asynchronous: reading the outputs back waits for them.
        return _to_numpy(self._run(self._host_tensor(images), torch.from_numpy(image_sizes.astype(np.int64))))

    def submit(self, images: np.ndarray, image_sizes: np.ndarray) -> PendingBatch:
        """Start a batch. On CUDA this returns once the copy in, the forward and the copy out are
        queued, and input_buffer() then hands out the other batch to fill meanwhile; the result's
        arrays are reused two submits later, so copy what must outlive that. On CPU it runs here."""
        if self.device != "cuda":
            return Completed(self.infer(images, image_sizes))
        check_inputs(images, image_sizes, self.input_shape)
        return self._submit(self._host_tensor(images), image_sizes)

    def submit_device(self, images: torch.Tensor, image_sizes: np.ndarray) -> PendingBatch:
        """`submit` of a batch already on the runner's device (device_buffer()): nothing to copy in."""
        if images.device.type != self.device or images.dtype != torch.uint8 or tuple(images.shape) != self.input_shape:
            raise ValueError(f"images: expected uint8 {list(self.input_shape)} on {self.device}, got {images.dtype} "
                             f"{list(images.shape)} on {images.device}")
        check_sizes(image_sizes, self.input_shape)
        if self.device != "cuda":
            self._slot = (self._slot + 1) % len(self._hosts)
            return Completed(_to_numpy(self._run(images, torch.from_numpy(image_sizes.astype(np.int64)))))
        return self._submit(images, image_sizes)

    def _submit(self, images: torch.Tensor, image_sizes: np.ndarray) -> PendingBatch:
        slot, self._slot = self._slot, (self._slot + 1) % len(self._hosts)
        # Page-locked sizes too: a copy from pageable memory may wait for the stream.
        sizes = self._host_sizes[slot].copy_(torch.from_numpy(image_sizes.astype(np.int64)))
        outputs = self._run(images, sizes)
        host = self._host_outputs[slot]
        if host is None:  # shapes are fixed: allocated on the first batch of each slot
            host = {name: torch.empty(outputs[name].shape, dtype=_TORCH_OUTPUT_DTYPES[name], pin_memory=True)
                    for name in OUTPUT_NAMES}
            self._host_outputs[slot] = host
        for name in OUTPUT_NAMES:
            host[name].copy_(outputs[name].to(host[name].dtype), non_blocking=True)
        # blocking: result() sleeps in the driver until the batch is done instead of spinning a core
        done = torch.cuda.Event(blocking=True)
        done.record()
        # The outputs on the device are this batch's own (eager: new tensors; a CUDA graph's: clones).
        return _OnDevice({name: host[name].numpy() for name in OUTPUT_NAMES}, done, outputs)

    def _host_tensor(self, images: np.ndarray) -> torch.Tensor:
        """`images` as a CPU tensor: one of the page-locked batches when the caller filled one."""
        for host in self._hosts:
            if host.holds(images):
                return host.tensor
        return torch.from_numpy(images)

    def _eager(self, images: torch.Tensor, image_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            # Both copies asynchronous: a blocking one waits for the stream (a batch submitted before).
            sizes = image_sizes.to(self.device, non_blocking=True)
            return self._forward(images.to(self.device, non_blocking=True), sizes)

    def _first_compiled_call(self, images: torch.Tensor, image_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        compiled = torch.compile(self.static, fullgraph=True, dynamic=False)
        try:
            outputs = compiled(images, image_sizes)
        except Exception as exc:  # e.g. no C compiler for Triton's launcher, an op inductor cannot lower
            self.compiled = False
            self.compile_error = f"torch.compile failed, running uncompiled: {type(exc).__name__}: {exc}"
            log.warning("%s", self.compile_error)
            self._forward = self.static
            return self.static(images, image_sizes)
        self._forward = compiled
        return outputs

    def _first_cuda_call(self, images: torch.Tensor, image_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        static_in = (images.to("cuda"), image_sizes.to("cuda"))
        # Warm up on a side stream (lazy init, allocator, autotuning stay out of the graph).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._forward(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(graph):
                static_out = self._forward(*static_in)
        except RuntimeError as exc:  # an op synchronises with the host or leaves the device
            torch.cuda.synchronize()
            self.graph_error = f"CUDA graph capture failed, running eagerly: {exc}"
            self._run = self._eager
            return self._eager(images, image_sizes)
        self._graph, self._static_in, self._static_out = graph, static_in, static_out
        self._run = self._replay
        return self._replay(images, image_sizes)

    def _replay(self, images: torch.Tensor, image_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self._graph is not None and self._static_in is not None and self._static_out is not None
        self._static_in[0].copy_(images, non_blocking=True)
        self._static_in[1].copy_(image_sizes, non_blocking=True)  # a blocking copy waits for the stream
        self._graph.replay()
        return {name: t.clone() for name, t in self._static_out.items()}


# ----------------------------------------------------------------------------- TensorRT


def check_manifest(
    manifest: EngineManifest,
    *,
    tensorrt_version: str | None,
    plugin_version: int,
    input_shape: tuple[int, ...] | None = None,
    precision: str | None = None,
    source: str = "engine",
) -> None:
    """Raise EngineMismatch naming the first field that does not match, with expected and found.
    input_shape and precision are checked when the caller names them."""
    expected: list[tuple[str, Any, Any]] = [
        ("tensorrt_version", tensorrt_version, manifest.tensorrt_version),
        ("plugin_version", plugin_version, manifest.plugin_version),
        ("input_dtype", "uint8", manifest.input_dtype),
        ("output_bindings", len(OUTPUT_NAMES), len(manifest.output_bindings)),
    ]
    if input_shape is not None:
        expected.append(("input_shape", tuple(input_shape), manifest.input_shape))
    if precision is not None:
        expected.append(("precision", precision, manifest.precision))
    for name, want, found in expected:
        if want != found:
            hint = ("" if name in ("input_shape", "precision")
                    else " (rebuild it with `maskstream build-engine` on this machine)")
            raise EngineMismatch(
                f"{source}: manifest field {name} does not match: expected {want!r}, found {found!r}{hint}"
            )


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    if trt_dtype not in table:
        raise EngineMismatch(f"engine tensor dtype {trt_dtype} has no torch counterpart here")
    return table[trt_dtype]


def _dims(dims: Any) -> tuple[int, ...]:
    """trt.Dims -> tuple of ints."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def engine_manifest(engine_path: str | Path) -> EngineManifest:
    """The manifest beside an engine (NAME.json); EngineMismatch if there is none."""
    path = Path(engine_path)
    sidecar = manifest_path(path)
    if not sidecar.is_file():
        raise EngineMismatch(
            f"{path}: no manifest {sidecar.name} beside the engine, so nothing says what it was built from; "
            "rebuild it with `maskstream build-engine`"
        )
    return EngineManifest.read(sidecar)


class TensorRTRunner:
    """A TensorRT engine built by `build_engine`, run with `execute_async_v3` on torch CUDA buffers."""

    def __init__(self, engine_path: str | Path, input_shape: tuple[int, int, int, int] | None = None,
                 precision: Precision | None = None):
        path = Path(engine_path)
        self.manifest = engine_manifest(path)
        version = tensorrt_version()
        if version is None:
            raise TensorRTUnavailable(f"{path}: running an engine needs TensorRT, not installed: {INSTALL_HINT}")
        check_manifest(
            self.manifest, tensorrt_version=version, plugin_version=plugin_version(), input_shape=input_shape,
            precision=precision, source=str(path),
        )
        if not torch.cuda.is_available():
            raise TensorRTUnavailable(f"{path}: running an engine needs a CUDA device")
        import tensorrt as trt

        self.input_shape: tuple[int, int, int, int] = self.manifest.input_shape
        self.contract = InferenceContract.from_manifest(self.manifest)
        self.asynchronous = False  # infer() synchronises its stream; submit() runs to the end
        self.compile_error: str | None = None  # built ahead of time: nothing to compile or capture here
        self.graph_error: str | None = None
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineMismatch(f"{path}: TensorRT {version} cannot deserialize it (built for another GPU/version?)")
        self._engine = engine
        self._context = engine.create_execution_context()
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        bindings = (*self.manifest.input_bindings, *self.manifest.output_bindings)
        missing = [n for n in bindings if n not in names]
        if missing:
            raise EngineMismatch(f"{path}: manifest bindings {missing} are not in the engine (it has {sorted(names)})")
        engine_shape = _dims(engine.get_tensor_shape(self.manifest.input_bindings[0]))
        if engine_shape != self.manifest.input_shape:
            raise EngineMismatch(
                f"{path}: manifest field input_shape does not match the engine: "
                f"expected {self.manifest.input_shape}, found {engine_shape}"
            )
        self._buffers: dict[str, torch.Tensor] = {}
        for name in bindings:  # fixed shapes: allocate once, bind once
            shape = _dims(engine.get_tensor_shape(name))
            buffer = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)), device="cuda")
            self._context.set_tensor_address(name, buffer.data_ptr())
            self._buffers[name] = buffer
        self._stream = torch.cuda.Stream()
        self._host = HostBatch(self.input_shape, pinned=True)

    def input_buffer(self) -> np.ndarray:
        return self._host.array

    def submit(self, images: np.ndarray, image_sizes: np.ndarray) -> PendingBatch:
        """`infer`, run to the end here: one engine context runs one batch at a time."""
        return Completed(self.infer(images, image_sizes))

    def infer(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        check_inputs(images, image_sizes, self.input_shape)
        images_name, sizes_name = self.manifest.input_bindings
        with torch.cuda.stream(self._stream):  # the stream is synchronised before returning
            self._buffers[images_name].copy_(self._host.as_tensor(images), non_blocking=True)
            self._buffers[sizes_name].copy_(torch.from_numpy(image_sizes.astype(np.int64)))
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            outputs = {
                out: self._buffers[binding].to("cpu")
                for out, binding in zip(OUTPUT_NAMES, self.manifest.output_bindings)
            }
        self._stream.synchronize()
        return _to_numpy(outputs)


# ----------------------------------------------------------------------------- choice


@dataclass(frozen=True)
class RunnerSpec:
    """What to run: an engine file, or a checkpoint + config (and precision) for the torch runner.

    input_shape: what the caller will feed (B, 3, H, W); an engine built for another shape is refused.
    """

    engine: Path | None = None
    checkpoint: Path | None = None
    config: ModelConfig = field(default_factory=ModelConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    input_shape: tuple[int, int, int, int] | None = None
    # The torch runner's (None: fp32). An engine has the precision it was built with: named here,
    # it must match the manifest's.
    precision: Precision | None = None
    # The torch runner's forward through torch.compile (TorchRunner); None: on CUDA, where it
    # pays for its compile at start many times over, not on a CPU.
    compile: bool | None = None
    # The torch runner: initialises whatever the checkpoint does not cover (same seed, same weights).
    seed: int = 0
    # The torch runner on CUDA: float32 products in TF32 (configure_process sets the process for it).
    tf32: bool = True


def runner_choice(spec: RunnerSpec) -> str:
    """Which runner `make_runner(spec)` builds: "tensorrt", "torch-cuda" or "torch-cpu"."""
    if spec.engine is not None:
        return "tensorrt"
    if spec.device == "auto":
        return "torch-cuda" if torch.cuda.is_available() else "torch-cpu"
    return f"torch-{spec.device}"


def make_runner(spec: RunnerSpec) -> TensorRTRunner | TorchRunner:
    """Build the runner once, at start: an engine -> TensorRTRunner; else torch on CUDA if there is one."""
    choice = runner_choice(spec)
    if choice == "tensorrt":
        assert spec.engine is not None
        return TensorRTRunner(spec.engine, input_shape=spec.input_shape, precision=spec.precision)
    # The seed drawn from a forked generator: the process's own random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = build(config=spec.config, checkpoint=spec.checkpoint)
    runner = TorchRunner(net, device=choice.removeprefix("torch-"), precision=spec.precision or "fp32",
                         compile=choice == "torch-cuda" if spec.compile is None else spec.compile, tf32=spec.tf32)
    if spec.input_shape is not None and tuple(spec.input_shape) != runner.input_shape:
        raise ValueError(f"input_shape: the config's static graph takes {list(runner.input_shape)}, "
                         f"the caller expects {list(spec.input_shape)}")
    return runner
