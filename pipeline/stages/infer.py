"""infer: `ModelInput` -> `RawDetections`, batching frames across streams up to the runner's batch.

The runner is chosen once, at start (model.runners.make_runner), and refused unless it takes and
gives what the run was planned with (the `InferenceContract`: the shape preprocess pads to, K,
the class names postprocess uses). A partial batch runs once no frame arrived for
batch_timeout_s. Live frames older than staleness_s are dropped here, so a slow model answers for
the newest frames instead of working through a backlog.

overlap (on by default with the CUDA runner): a batch is submitted and left on the device while
the next one fills; its results go out when that next batch is submitted (or nothing arrived for
batch_timeout_s), so copying frames in and sending results no longer wait on the device, nor the
device on them (`maskstream bench` measures the gain). Its frames' stamps start when it was
submitted (`Timed`). Off, each batch runs to the end before the stage takes the next frame. A
live frame waits at most one batch longer with it. Where submit() runs the batch to the end
(CPU, TensorRT) it gains nothing, so it is off there unless asked for.

frames (the plan's choice with the CUDA runner, infer.preprocess): the stage takes decode's
`Frame`s, in their native planes, instead of the preprocess stage's `ModelInput`s, and makes the
model's input itself on the runner's device (pipeline.media.gpu_preprocess, equal to the CPU
preprocess), straight into the runner's device batch: no resized frame is made on the CPU or
copied through it. On CUDA the decoders' rings are page-locked (model.page_lock) so each frame's
planes go to the device in one DMA, on a stream of their own, which the stage waits for (without
spinning) before the ring slot is released; the batch on the device is not waited for.

crops (infer.masks): the masks are pasted into their boxes and thresholded here, on the runner's
device, every instance of a batch in one pass (model.mask_crops.packed_crops; the boxes scaled to
frame pixels there with the postprocess stage's own float32 ratios), and each frame's
RawDetections carries its instances' binary crops, bit-packed, instead of their probabilities:
postprocess then only encodes them (no paste there), and only the crops come back from the device.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from maskstream.model.contract import InferenceContract
from maskstream.model.mask_crops import packed_crops
from maskstream.model.page_lock import PageLocks
from maskstream.model.runners import PendingBatch, RunnerSpec, TorchRunner, configure_process, make_runner
from maskstream.pipeline.media.gpu_preprocess import Letterbox
from maskstream.pipeline.runtime.messages import (
    EndOfStream,
    Frame,
    Header,
    Message,
    ModelInput,
    RawDetections,
    StreamProgress,
)
from maskstream.pipeline.runtime.stage import Output, Stage, Timed, Wiring, run_stage
from maskstream.pipeline.stages.postprocess import box_ratios

log = logging.getLogger("maskstream.infer")


@dataclass(frozen=True)
class InferConfig:
    runner: RunnerSpec
    contract: InferenceContract  # what the runner must take and give (pipeline.run_config.plan decides it)
    batch_timeout_s: float = 0.005
    staleness_s: float = 1.0
    live_streams: tuple[str, ...] = ()
    # Keep one batch on the device while the next fills (see the module docstring); None: when the
    # runner's submit() is asynchronous (torch on CUDA), where nothing else would overlap them.
    overlap: bool | None = None
    # Take decode's Frames and preprocess them on the runner's device (see the module docstring);
    # False: the preprocess stage's ModelInputs.
    frames: bool = False
    # Paste and threshold the masks on the runner's device and send their binary crops (see the
    # module docstring); False: the mask probabilities, pasted by postprocess.
    crops: bool = False
    mask_threshold: float = 0.5  # with crops: the postprocess stage's (PostprocessConfig.mask_threshold)


@dataclass(frozen=True)
class _Item:
    """A frame preprocessed here, in the batch being filled: what its results need (a
    ModelInput's own fields)."""

    header: Header
    valid_hw: tuple[int, int]
    frame_hw: tuple[int, int]


@dataclass(frozen=True)
class _Batch:
    frames: list[ModelInput | _Item]
    outputs: PendingBatch
    submitted_at: float  # time.monotonic(): where its frames' infer stamps start


class InferStage(Stage):
    def __init__(self, config: InferConfig):
        self.config = config
        self.runner = make_runner(config.runner)
        config.contract.check(self.runner.contract, "infer: the runner", "the run's inference contract")
        self.overlap = self.runner.asynchronous if config.overlap is None else config.overlap
        batch, _, height, width = self.runner.input_shape
        self.images = self.runner.input_buffer()  # the batch, filled in place (page-locked for a GPU)
        self.device_images: torch.Tensor | None = None  # with frames: the batch on the device, filled in place
        self.letterbox: Letterbox | None = None
        self.page_locks: PageLocks | None = None
        self.copy_stream: torch.cuda.Stream | None = None
        if config.frames:
            if not isinstance(self.runner, TorchRunner):
                raise ValueError("infer: frames (preprocess in the inference process) needs the torch runner; "
                                 "plan the run with infer.preprocess=stage")
            self.device_images = self.runner.device_buffer()
            self.letterbox = Letterbox(config.contract.input_hw, config.contract.pad_rgb)
            if self.runner.device == "cuda":
                self.page_locks, self.copy_stream = PageLocks(), torch.cuda.Stream()
        # One inference before the stage reports ready (decoders start only then): lazy set-up
        # (allocator, kernel selection; on CUDA the Triton compiles and the CUDA graph capture)
        # would otherwise land on the first frame, a latency spike a live stream pays in drops.
        self.runner.infer(self.images, np.array([[height, width]] * batch, dtype=np.int64))
        # A torch runner that could not compile or capture its graph still runs, slower: say so.
        for problem in (self.runner.compile_error, self.runner.graph_error):
            if problem:
                log.warning("infer: %s", problem)
        self.pending: list[ModelInput | _Item] = []
        self.in_flight: _Batch | None = None  # with overlap: the batch on the device
        self.drops: dict[str, int] = {}
        self.frames: dict[str, int] = {}

    @property
    def live_streams(self) -> tuple[str, ...]:
        return self.config.live_streams

    def overtaken(self, message: Message) -> list[Output]:
        """A live frame a newer one of its stream has overtaken in the queue: dropped, counted.
        An end of stream is never dropped (a restarted source's messages may follow it)."""
        if isinstance(message, EndOfStream):
            return self.process(message)
        self.drops[message.header.stream_id] = self.drops.get(message.header.stream_id, 0) + 1
        return []

    @property
    def idle_timeout_s(self) -> float | None:
        return self.config.batch_timeout_s if self.pending or self.in_flight else None

    def process(self, message: Message) -> list[Output]:
        if isinstance(message, EndOfStream):  # its drops complete the stream's account
            stream = message.header.stream_id
            header = message.header.with_drops("infer", self.drops[stream]) if stream in self.drops else message.header
            return [*self._drain(), dataclasses.replace(message, header=header)]
        expected = Frame if self.config.frames else ModelInput
        if not isinstance(message, expected):
            raise TypeError(f"expected {expected.__name__} or EndOfStream, got {type(message).__name__}")
        stream = message.header.stream_id
        if stream in self.config.live_streams and message.header.stamps:
            if time.monotonic() - message.header.stamps[0].start > self.config.staleness_s:
                self.drops[stream] = self.drops.get(stream, 0) + 1
                return []
        item: ModelInput | _Item
        if isinstance(message, Frame):
            item = _Item(message.header, *self._preprocess(message))
        else:
            self._copy_in(message)
            item = message
        if stream in self.drops:  # now, not at flush: the count must cover only frames before this one
            item = dataclasses.replace(item, header=item.header.with_drops("infer", self.drops[stream]))
        self.pending.append(item)
        return self.flush() if len(self.pending) == len(self.images) else []

    def _copy_in(self, message: ModelInput) -> None:
        # Checked before the frame joins the batch (the inbox checked them too): a frame the runner
        # cannot take must fail alone, not the batch it would have joined.
        _, height, width = self.images.shape[1:]
        if message.image.shape != self.images.shape[1:] or message.image.dtype != np.uint8:
            raise ValueError(f"image: expected uint8 {list(self.images.shape[1:])}, got {message.image.dtype} "
                             f"{list(message.image.shape)}")
        valid_h, valid_w = message.valid_hw
        if not (0 < valid_h <= height and 0 < valid_w <= width):
            raise ValueError(f"valid_hw: {list(message.valid_hw)} is not inside the {height}x{width} input")
        self.images[len(self.pending)] = message.image  # copy out: the ring slot is released after process()

    def _preprocess(self, message: Frame) -> tuple[tuple[int, int], tuple[int, int]]:
        """The frame's model input made on the device, into its row of the device batch; returns
        once nothing reads the frame's planes any more (the ring slot is released after process())."""
        assert self.letterbox is not None and self.device_images is not None
        out = self.device_images[len(self.pending)]
        with warnings.catch_warnings():  # a ring slot is read-only; nothing here writes to it
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            planes = torch.from_numpy(message.image)
        if self.copy_stream is None:
            return self.letterbox(planes, message.pixel_format, out)
        assert self.page_locks is not None
        # once per ring: then the copy below is one DMA (a frame sent inline is in no ring)
        if not self.page_locks.register(message.image) and self.page_locks.problem is not None:
            log.warning("infer: %s: its frames go to the device through a staging copy", self.page_locks.problem)
            self.page_locks.problem = None  # said once per failure
        with torch.cuda.stream(self.copy_stream):
            sizes = self.letterbox(planes.to(out.device, non_blocking=True), message.pixel_format, out)
            read = torch.cuda.Event(blocking=True)  # waited for by sleeping in the driver, not spinning
            read.record(self.copy_stream)
        read.synchronize()
        return sizes

    def flush(self) -> list[Output]:
        """Run the pending frames and return their results; with overlap, submit them and return
        the results of the batch that was on the device instead (the next call returns theirs)."""
        done = [self.in_flight] if self.in_flight is not None else []
        self.in_flight = None
        if self.pending:
            batch = self._submit()
            if self.overlap:
                self.in_flight = batch  # submitted before the wait below: the device goes on at once
            else:
                done.append(batch)
        return [result for batch in done for result in self._results(batch)]

    def _drain(self) -> list[Output]:
        """Every frame the stage holds, run and returned (an end of stream follows its frames)."""
        results = self.flush()  # the batch on the device, if any; submits the pending frames
        return results + self.flush()  # with overlap, those just submitted

    def _submit(self) -> _Batch:
        batch, _, height, width = self.images.shape
        sizes = np.array([[height, width]] * batch, dtype=np.int64)  # rows past the pending ones: any valid size
        sizes[: len(self.pending)] = [m.valid_hw for m in self.pending]
        # Taken before the runner runs: should it raise, these frames are lost (and said so), and
        # the next batch starts empty instead of overflowing a full one.
        frames, self.pending = self.pending, []
        submitted_at = time.monotonic()
        try:
            if self.device_images is not None:
                assert isinstance(self.runner, TorchRunner)
                outputs = self.runner.submit_device(self.device_images, sizes)
            else:
                outputs = self.runner.submit(self.images, sizes)
            if not self.overlap:
                outputs.result()  # run to the end here
        except Exception as exc:
            lost = ", ".join(f"{m.header.stream_id}#{m.header.seq}" for m in frames)
            raise RuntimeError(f"the batch of {lost} failed: {type(exc).__name__}: {exc}") from exc
        self.images = self.runner.input_buffer()  # with overlap on CUDA, the other page-locked batch
        if self.device_images is not None:
            assert isinstance(self.runner, TorchRunner)
            self.device_images = self.runner.device_buffer()
        return _Batch(frames, outputs, submitted_at)

    def _results(self, batch: _Batch) -> list[Output]:
        out = batch.outputs.result()
        counts = [int(out["num_detections"][i]) for i in range(len(batch.frames))]
        crops = self._crops(batch, counts) if self.config.crops else None
        results: list[Output] = []
        for i, (m, n) in enumerate(zip(batch.frames, counts)):
            stream = m.header.stream_id
            self.frames[stream] = self.frames.get(stream, 0) + 1
            # Copies: a submitted batch's arrays are the runner's, reused two batches later, and
            # sending may read them after this returns.
            boxes, scores, labels = (out[name][i, :n].copy() for name in ("boxes", "scores", "labels"))
            if crops is None:
                detections = RawDetections(m.header, boxes, scores, labels, out["mask_probs"][i, :n].copy(),
                                           m.valid_hw, m.frame_hw)
            else:
                detections = RawDetections(m.header, boxes, scores, labels, None, m.valid_hw, m.frame_hw, *crops[i])
            results.append(Timed(detections, batch.submitted_at))
        return results

    def _crops(self, batch: _Batch, counts: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each frame's (crop boxes, crop bits): its masks pasted and thresholded on the device."""
        return device_crops(batch.outputs.tensors(), [(m.valid_hw, m.frame_hw) for m in batch.frames], counts,
                            self.config.mask_threshold)

    def progress(self) -> tuple[StreamProgress, ...]:
        return tuple(StreamProgress(s, n, self.drops.get(s, 0)) for s, n in self.frames.items())

    def close(self) -> None:
        if self.page_locks is not None:  # before the stage loop unmaps the rings
            self.page_locks.close()


def device_crops(outputs: dict[str, torch.Tensor], frames: Sequence[tuple[tuple[int, int], tuple[int, int]]],
                 counts: Sequence[int], threshold: float = 0.5) -> list[tuple[np.ndarray, np.ndarray]]:
    """A batch's masks pasted and thresholded where the runner left them (outputs: a PendingBatch's
    tensors(), boxes [B, K, 4] in model-input pixels and mask_probs [B, K, M, M]; each frame's
    (valid_hw, frame_hw) and instance count) -> each frame's (crop boxes, crop bits), as
    RawDetections carries them."""
    probs = torch.cat([outputs["mask_probs"][i, :n] for i, n in enumerate(counts)])
    boxes = torch.cat([outputs["boxes"][i, :n] for i, n in enumerate(counts)]).to(torch.float32)
    # model-input pixels -> frame pixels: the postprocess stage's float32 products, made here
    ratios = np.concatenate([np.broadcast_to(box_ratios(valid_hw, frame_hw), (n, 4))
                             for (valid_hw, frame_hw), n in zip(frames, counts)]).reshape(-1, 4)
    frame_boxes = boxes * torch.from_numpy(ratios).to(boxes.device)
    return packed_crops(probs, frame_boxes, [frame_hw for _, frame_hw in frames], counts, threshold)


def main(config: InferConfig, wiring: Wiring) -> None:
    configure_process(tf32=config.runner.tf32)  # process-wide torch flags: here, not in a constructor
    run_stage(lambda: InferStage(config), wiring)
