"""The inference process making the model's input itself (infer.preprocess=infer): decode's frames
in, the same detections out as the CPU preprocess stage followed by the inference stage; the plan
without a preprocess stage; the choice of where preprocess runs."""
from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import av
import numpy as np
import pytest
from maskstream.model.contract import InferenceContract
from maskstream.model.runners import RunnerSpec
from maskstream.pipeline.config import load_config
from maskstream.pipeline.media.pixels import RGB24, frame_pixels
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.run_config import (
    CONFIG_DIR,
    ModelSelection,
    RunConfig,
    masks_in_infer,
    plan,
    preprocess_in_infer,
)
from maskstream.pipeline.runtime.messages import EndOfStream, Frame, Header, RawDetections
from maskstream.pipeline.runtime.stage import Timed
from maskstream.pipeline.stages.infer import InferConfig, InferStage
from maskstream.pipeline.stages.preprocess import PreprocessConfig, PreprocessStage

from tests.pipeline_runs import ROOT, TINY_MODEL_SETS
from tests.tiny_models import tiny_runner_config


def _stage(frames: bool, overlap: bool = False) -> InferStage:
    config = tiny_runner_config()
    return InferStage(InferConfig(RunnerSpec(config=config, device="cpu", seed=0),
                                  InferenceContract.from_model_config(config), overlap=overlap, frames=frames))


def _frames() -> list[Frame]:
    """Frames as decode ships them: I420 planes (a 2-mod-4 height among them) and RGB (odd size)."""
    rng = np.random.default_rng(0)
    out = []
    for seq, (height, width, fmt) in enumerate([(270, 480, "yuv420p"), (240, 320, "yuvj420p"), (241, 333, "rgb24"),
                                                (480, 640, "yuv420p"), (100, 90, "yuv420p")]):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if fmt == RGB24:
            image, pixel_format = rgb, RGB24
        else:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=fmt)
            image, pixel_format = frame_pixels(frame, lambda shape: np.empty(shape, np.uint8))
        image.flags.writeable = False  # as a ring slot's view is
        out.append(Frame(Header("s", seq), image, pixel_format))
    return out


def _results(outputs) -> list[RawDetections]:
    return [o.message if isinstance(o, Timed) else o for o in outputs
            if isinstance(o.message if isinstance(o, Timed) else o, RawDetections)]


@pytest.mark.parametrize("overlap", [False, True])
def test_frames_preprocessed_in_the_inference_process_give_the_stage_path_detections(overlap):
    config = tiny_runner_config()
    pre = PreprocessStage(PreprocessConfig(InferenceContract.from_model_config(config)))
    staged, direct = _stage(frames=False), _stage(frames=True, overlap=overlap)
    expected, got = [], []
    for frame in _frames():
        expected += _results(staged.process(pre.process(frame)))
        got += _results(direct.process(frame))
    expected += _results(staged.process(EndOfStream(Header("s", 5))))
    got += _results(direct.process(EndOfStream(Header("s", 5))))
    assert [m.header.seq for m in got] == [m.header.seq for m in expected] == [0, 1, 2, 3, 4]
    for a, b in zip(got, expected):
        assert a.valid_hw == b.valid_hw and a.frame_hw == b.frame_hw
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.mask_probs, b.mask_probs)
    with pytest.raises(TypeError, match="expected Frame or EndOfStream, got ModelInput"):
        direct.process(pre.process(_frames()[0]))


def test_preprocess_runs_in_the_inference_process_on_cuda_unless_told_otherwise():
    assert load_config(RunConfig, CONFIG_DIR / "pipeline.yaml").infer.preprocess == "auto"
    assert preprocess_in_infer("auto", "torch-cuda") and not preprocess_in_infer("auto", "torch-cpu")
    assert not preprocess_in_infer("auto", "tensorrt") and not preprocess_in_infer("stage", "torch-cuda")
    assert preprocess_in_infer("infer", "torch-cpu")
    with pytest.raises(ValueError, match="infer.preprocess: infer needs the torch runner"):
        preprocess_in_infer("infer", "tensorrt")
    with pytest.raises(ValueError, match="infer.preprocess"):
        load_config(RunConfig, None, ["infer.preprocess=gpu"])


def test_masks_go_as_probabilities_unless_asked_and_as_crops_with_auto_on_cuda():
    assert load_config(RunConfig, CONFIG_DIR / "pipeline.yaml").infer.masks == RunConfig().infer.masks == "probs"
    assert masks_in_infer("crops", "torch-cpu") and masks_in_infer("crops", "tensorrt")
    assert masks_in_infer("auto", "torch-cuda") and not masks_in_infer("auto", "torch-cpu")
    assert not masks_in_infer("auto", "tensorrt") and not masks_in_infer("probs", "torch-cuda")
    with pytest.raises(ValueError, match="infer.masks: expected auto, probs or crops, got 'gpu'"):
        masks_in_infer("gpu", "torch-cuda")
    with pytest.raises(ValueError, match="infer.masks"):
        load_config(RunConfig, None, ["infer.masks=gpu"])
    base = RunConfig(sources=("a.mp4",), model=ModelSelection(config=CONFIG_DIR / "model_lite.yaml", device="cpu"))
    for masks, crops in (("probs", False), ("auto", False), ("crops", True)):
        specs = _planned(dataclasses.replace(base, infer=dataclasses.replace(base.infer, masks=masks)))
        assert specs["infer.0"].config.crops is crops
        # infer thresholds the crops at the threshold postprocess would paste with
        assert specs["infer.0"].config.mask_threshold == specs["postprocess.0"].config.mask_threshold
        form = "crops" if crops else "probs"
        assert {specs[name].wiring.limits.raw_masks for name in specs if specs[name].wiring.inbox} == {form}


def _planned(cfg: RunConfig):
    the_plan = plan(cfg)
    the_plan.close()
    return {spec.name: spec for spec in the_plan.specs}


def test_a_run_that_preprocesses_in_the_inference_process_has_no_preprocess_stage(caplog):
    base = RunConfig(sources=("a.mp4", "b.mp4"), model=ModelSelection(config=CONFIG_DIR / "model_lite.yaml",
                                                                       device="cpu"))
    staged = _planned(base)
    assert {"preprocess.0", "infer.0"} <= set(staged) and not staged["infer.0"].config.frames
    caplog.clear()  # the plan above said it too, where this process's log level lets it through
    with caplog.at_level(logging.INFO, logger="maskstream.decode"):
        direct = _planned(dataclasses.replace(base, infer=dataclasses.replace(base.infer, preprocess="infer")))
    assert not any(name.startswith("preprocess") for name in direct)
    infer = direct["infer.0"]
    assert infer.config.frames and infer.wiring.limits.kinds == ("Frame", "EndOfStream")
    decoders = [spec for name, spec in direct.items() if name.startswith("decode.")]
    assert len(decoders) == 2 and all(spec.wiring.outboxes == (infer.wiring.inbox,) for spec in decoders)
    assert set(infer.reads) == {spec.wiring.ring for spec in decoders}
    # no CUDA device here: auto decodes on the CPU and says why, once per run
    assert all(spec.config.source.decoder == "cpu" for spec in decoders)
    reasons = [r.getMessage() for r in caplog.records if r.name == "maskstream.decode"]
    assert len(reasons) == 1 and "NVDEC is unavailable" in reasons[0]


def test_a_run_with_preprocess_in_the_inference_process_publishes_what_the_staged_run_does(tmp_path):
    """End to end, processes and rings: decode's planes (a 2-mod-4 height) straight to the inference
    process give the same JSONL as the preprocess stage's path, frame for frame."""
    clip = write_test_clip(tmp_path / "c.mp4", frames=6, size=(160, 90))
    outputs = {}
    for where in ("stage", "infer"):
        out = tmp_path / f"{where}.jsonl"
        (tmp_path / where).mkdir()
        sets = [x for s in TINY_MODEL_SETS for x in ("--set", s)]
        done = subprocess.run([sys.executable, "-m", "maskstream.pipeline.cli", "run", "--quiet", "--out-dir",
                               str(tmp_path / where / "out"), *sets, "--source", str(clip), "--out", str(out),
                               "--preprocess", where, "--decode", "cpu", "--set",
                               f"transport.endpoint_dir={tmp_path / where}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stderr
        outputs[where] = [{k: v for k, v in json.loads(line).items() if k != "stamps"}  # stamps differ per run
                          for line in out.read_text().splitlines()]
    assert [line["seq"] for line in outputs["infer"]] == list(range(7))  # 6 frames + EndOfStream
    assert outputs["infer"] == outputs["stage"]


def test_page_locking_finds_the_ring_mapping_a_frame_lies_in():
    """What cudaHostRegister is given (model.page_lock): the whole mapping of the ring a frame's
    planes were read from, found through the array's bases; nothing for an array of its own."""
    import mmap

    from maskstream.model.page_lock import _address, _mapping_of
    from maskstream.pipeline.runtime.shm_ring import Ring, owner_tag

    ring = Ring.create(f"maskstream-{owner_tag()}-pagelock", 2, 180 * 160)
    try:
        planes = np.frombuffer(ring.slot_view(1, 180 * 160), np.uint8).reshape(180, 160)[:, :80]
        mapping = _mapping_of(planes)
        assert isinstance(mapping, mmap.mmap) and len(mapping) >= 2 * 180 * 160
        assert _address(mapping) <= planes.ctypes.data < _address(mapping) + len(mapping)
        assert _mapping_of(np.zeros((4, 4), np.uint8)) is None
        del planes, mapping
    finally:
        ring.close(unlink=True)
