"""Runners, engine manifest and the TensorRT-less paths, for real on this machine (no TensorRT here)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from maskstream.configs import CONFIG_DIR
from maskstream.model.bundled import BUNDLED_CHECKPOINT, BUNDLED_CONFIG
from maskstream.model.config import ModelConfig
from maskstream.model.engine import (
    EngineManifest,
    EngineMismatch,
    ManifestError,
    build_engine,
    manifest_path,
    nms_score_threshold,
    op_arguments,
    prepare_static,
)
from maskstream.model.fuse import fold_batch_norms
from maskstream.model.mask_rcnn import build
from maskstream.model.runners import (
    OUTPUT_DTYPES,
    Completed,
    RunnerSpec,
    TensorRTRunner,
    TorchRunner,
    check_manifest,
    configure_process,
    make_runner,
    runner_choice,
)
from maskstream.model.static import OUTPUT_NAMES, HalfBackbone, HalfMaskHead, StaticMaskRCNN, export
from maskstream.model.synthetic import scene_batch
from maskstream.pipeline.cli.main import main
from maskstream.pipeline.config import load_config
from maskstream.plugins.roi_align.registration import SPEC_PATH, plugin_version
from maskstream.plugins.tensorrt_env import TensorRTUnavailable, tensorrt_version

from tests.tiny_models import SHAPE, tiny_manifest, tiny_runner_config

NO_TENSORRT = tensorrt_version() is None


@pytest.fixture(scope="module", autouse=True)
def tf32_process():
    """The inference stage's process settings (its `main` calls configure_process), which a CUDA
    TorchRunner checks; restored after this module."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    configure_process(tf32=True)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build(config=tiny_runner_config()).eval()


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (SHAPE.batch, 3, SHAPE.height, SHAPE.width), dtype=np.uint8)
    sizes = np.array([[SHAPE.height, SHAPE.width], [96, 128]], dtype=np.int32)  # second frame letterboxed
    return images, sizes


# ----------------------------------------------------------------------------- TorchRunner


def test_torch_runner_cpu_equals_the_static_graph(net, frames):
    runner = TorchRunner(net, device="cpu")
    assert runner.input_shape == (2, 3, 128, 160)
    out = runner.infer(*frames)
    with torch.no_grad():
        # the runner folds the norm layers (equivalence of folding: tests/test_model.py) and runs
        # its convolutions channels_last on CPU (the same graph, so the same arithmetic)
        assert runner.channels_last
        direct = StaticMaskRCNN(fold_batch_norms(net)).eval().to(memory_format=torch.channels_last)(
            torch.from_numpy(frames[0]), torch.from_numpy(frames[1]).long()
        )
    assert tuple(out) == OUTPUT_NAMES
    for name in OUTPUT_NAMES:
        assert out[name].dtype == OUTPUT_DTYPES[name], name
        np.testing.assert_array_equal(out[name], direct[name].numpy(), err_msg=name)
    assert out["boxes"].shape == (2, 10, 4) and out["mask_probs"].shape == (2, 10, 28, 28)
    assert (out["num_detections"] == 10).all()
    assert out["boxes"][1, :, 2].max() <= 128 and out["boxes"][1, :, 3].max() <= 96  # clipped to (h, w)
    again = runner.infer(*frames)  # the same arrays, not views of reused buffers
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(again[name], out[name])


@pytest.mark.parametrize(
    "images, sizes, error, message",
    [
        (np.zeros((2, 3, 128, 160), np.float32), None, ValueError, "images: expected uint8 [2, 3, 128, 160]"),
        (np.zeros((1, 3, 128, 160), np.uint8), None, ValueError, "got uint8 [1, 3, 128, 160]"),
        (np.zeros((2, 128, 160, 3), np.uint8), None, ValueError, "(B, 3, H, W)"),
        ([[0]], None, TypeError, "images: expected a numpy array"),
        (None, np.array([[128, 160], [96, 128]], np.float32), ValueError, "image_sizes: expected integer [2, 2]"),
        (None, np.array([[128, 160]]), ValueError, "got int64 [1, 2]"),
        (None, [[128, 160], [96, 128]], TypeError, "image_sizes: expected a numpy integer array"),
        (None, np.array([[129, 160], [96, 128]]), ValueError, "within 1..128 x 1..160"),
        (None, np.array([[128, 160], [96, 0]]), ValueError, "within 1..128 x 1..160"),
    ],
)
def test_torch_runner_rejects_bad_inputs(net, frames, images, sizes, error, message):
    runner = TorchRunner(net)
    with pytest.raises(error) as info:
        runner.infer(frames[0] if images is None else images, frames[1] if sizes is None else sizes)
    assert message in str(info.value)


def test_cpu_submit_runs_the_batch_at_once(net, frames):
    runner = TorchRunner(net, device="cpu")
    pending = runner.submit(*frames)
    assert isinstance(pending, Completed)  # on CPU submit runs to the end; the stage then overlaps nothing
    want = runner.infer(*frames)
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(pending.result()[name], want[name], err_msg=name)


def test_torch_runner_input_buffer_is_the_fast_path_for_the_same_result(net, frames):
    runner = TorchRunner(net, device="cpu")
    buffer = runner.input_buffer()
    assert buffer.dtype == np.uint8 and buffer.shape == runner.input_shape and buffer is runner.input_buffer()
    buffer[...] = frames[0]
    filled = runner.infer(buffer, frames[1])
    assert runner._host_tensor(buffer) is runner._hosts[0].tensor  # no copy on the way in
    other = runner.infer(frames[0].copy(), frames[1])  # any array still works
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(filled[name], other[name], err_msg=name)


def test_torch_runner_compiled_gives_the_eager_outputs(net, frames):
    """torch.compile (inductor, fullgraph: the custom RoIAlign and NMS ops included) runs the same
    graph: same detections, same boxes up to float rounding of the fused kernels."""
    compiled = TorchRunner(net, device="cpu", compile=True)
    assert compiled.compiled and not compiled.asynchronous  # CPU: submit runs to the end
    out = compiled.infer(*frames)  # compiles here (about a minute and a half on 2 cores)
    assert_same_detections(out, TorchRunner(net, device="cpu").infer(*frames), box_px=1e-3, score=1e-5, mask=1e-4)


def test_torch_runner_that_cannot_compile_runs_uncompiled_and_says_why(net, frames, monkeypatch, caplog):
    """A failing compile (no C compiler for Triton's launcher, an op inductor cannot lower: here
    injected) must not stop a pipeline: the runner goes on with the uncompiled graph, the same
    outputs, and the reason in compile_error and the log."""
    def cannot_compile(module, **options):
        def call(*inputs):
            raise RuntimeError("no C compiler found")
        return call

    monkeypatch.setattr(torch, "compile", cannot_compile)
    runner = TorchRunner(net, device="cpu", compile=True)
    with caplog.at_level("WARNING", logger="maskstream.runners"):
        out = runner.infer(*frames)
    assert not runner.compiled and runner.compile_error is not None
    assert "RuntimeError: no C compiler found" in runner.compile_error and runner.compile_error in caplog.text
    want = TorchRunner(net, device="cpu").infer(*frames)
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(out[name], want[name], err_msg=name)
    runner.infer(*frames)  # tried once: the next calls go straight to the uncompiled graph
    assert caplog.text.count("torch.compile failed") == 1


def test_torch_runner_device_errors(net):
    with pytest.raises(ValueError, match="device: expected 'cpu' or 'cuda'"):
        TorchRunner(net, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            TorchRunner(net, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_torch_runner_cuda_graph_replays_the_eager_outputs(net, frames):
    """The whole static graph (Triton RoIAlign and NMS included) captures into one CUDA graph, and
    its replays give what the same graph gives eagerly on the device."""
    graphed = TorchRunner(net, device="cuda")
    assert all(host.tensor.is_pinned() for host in graphed._hosts)  # the batches the stage fills: DMA
    graphed.input_buffer()[...] = frames[0]
    first = graphed.infer(graphed.input_buffer(), frames[1])  # warm-up + capture + first replay
    assert graphed.graph_error is None
    again = graphed.infer(*frames)
    eager = TorchRunner(net, device="cuda", cuda_graph=False).infer(*frames)
    for name in OUTPUT_NAMES:
        assert first[name].dtype == OUTPUT_DTYPES[name], name
        np.testing.assert_array_equal(again[name], first[name], err_msg=name)
        np.testing.assert_allclose(first[name], eager[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert (first["num_detections"] == SHAPE.detections).all()  # score threshold 0: every slot filled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_torch_runner_compiled_cuda_graph_gives_the_eager_outputs(net, frames):
    """The inductor-compiled forward (Triton kernels of its own beside ours) captures into one CUDA
    graph too, and finds what the eager graph finds on the device."""
    compiled = TorchRunner(net, device="cuda", compile=True)
    assert compiled.asynchronous
    out = compiled.infer(*frames)  # compile in the warm-up, then capture
    assert compiled.graph_error is None and compiled._graph is not None
    eager = TorchRunner(net, device="cuda", cuda_graph=False).infer(*frames)
    # Tolerances 10x the CPU test's: inductor may pick other convolution layouts, so other TF32 roundings.
    assert_same_detections(out, eager, box_px=1e-2, score=1e-3, mask=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_torch_runner_cuda_submit_overlaps_and_gives_what_infer_gives(net, frames):
    """submit returns with the batch queued; the next input_buffer() is the other page-locked
    batch, filled while the first runs; each result equals infer's on the same frames."""
    runner = TorchRunner(net, device="cuda")
    first_buffer = runner.input_buffer()
    first_buffer[...] = frames[0]
    want = runner.infer(first_buffer, frames[1])
    flipped = frames[0][::-1].copy()  # the batch's frames in the other order
    want_flipped = runner.infer(flipped, frames[1][::-1].copy())

    pending = runner.submit(first_buffer, frames[1])
    second_buffer = runner.input_buffer()
    assert second_buffer.ctypes.data != first_buffer.ctypes.data  # the other batch, free to fill now
    second_buffer[...] = flipped
    pending_flipped = runner.submit(second_buffer, frames[1][::-1].copy())
    assert runner.input_buffer().ctypes.data == first_buffer.ctypes.data
    got, got_flipped = pending.result(), pending_flipped.result()
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        np.testing.assert_array_equal(got_flipped[name], want_flipped[name], err_msg=name)


# ----------------------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path):
    original = tiny_manifest()
    path = tmp_path / "tiny.json"
    original.write(path)
    data = json.loads(path.read_text())
    assert data["input_shape"] == [2, 3, 128, 160] and data["precision"] == "fp16"
    assert EngineManifest.read(path) == original
    assert manifest_path(tmp_path / "tiny.engine") == path


@pytest.mark.parametrize(
    "edit, message",
    [
        # The package's one codec (configs/codec.py) words these as it words config errors.
        (lambda d: d.update(colour="blue"), "colour: unknown key (valid keys: input_shape, "),
        (lambda d: d.pop("checkpoint_sha256"), "checkpoint_sha256: missing required key (expected str)"),
        (lambda d: d.update(precision="int8"), "precision: expected one of 'fp32', 'fp16', got str 'int8'"),
        (lambda d: d.update(input_shape=[2, 3, 128]),
         "input_shape: expected a list [int, int, int, int] (4 items), got list of 3 [2, 3, 128]"),
        (lambda d: d.update(plugin_version="1"), "plugin_version: expected int, got str '1'"),
        (lambda d: d.update(detections=True), "detections: expected int, got bool True"),
        (lambda d: d.update(image_mean=[0.5, "x", 0.5]), "image_mean[1]: expected float, got str 'x'"),
        (lambda d: d.update(config=[1]), "config: expected a mapping, got list of 1 [1]"),
    ],
)
def test_manifest_read_is_strict(tmp_path, edit, message):
    data = tiny_manifest().to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        EngineManifest.read(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_manifest_read_errors(tmp_path):
    with pytest.raises(ManifestError, match="cannot read the engine manifest"):
        EngineManifest.read(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        EngineManifest.read(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ManifestError, match="expected a JSON object"):
        EngineManifest.read(tmp_path / "list.json")


def test_manifest_built_in_code_is_checked_too():
    with pytest.raises(ManifestError, match=r"input_shape: expected tuple \(a list \[int, int, int, int\]\), got list"):
        tiny_manifest(input_shape=[2, 3, 128, 160])
    with pytest.raises(ManifestError, match="precision: expected one of 'fp32', 'fp16', got str 'int8'"):
        tiny_manifest(precision="int8")
    with pytest.raises(ManifestError, match=r"class_names\[1\]: expected str, got int 1"):
        tiny_manifest(class_names=("__background__", 1))


GOOD = dict(tensorrt_version="11.0.0.114", plugin_version=1, input_shape=(2, 3, 128, 160))


@pytest.mark.parametrize(
    "changes, expect, field, expected, found",
    [
        ({}, dict(tensorrt_version="11.1.0.106"), "tensorrt_version", "'11.1.0.106'", "'11.0.0.114'"),
        ({}, dict(tensorrt_version=None), "tensorrt_version", "None", "'11.0.0.114'"),
        ({}, dict(plugin_version=2), "plugin_version", "2", "1"),
        ({}, dict(input_shape=(1, 3, 128, 160)), "input_shape", "(1, 3, 128, 160)", "(2, 3, 128, 160)"),
        (dict(input_dtype="float32"), {}, "input_dtype", "'uint8'", "'float32'"),
        (dict(output_bindings=("output0",)), {}, "output_bindings", "5", "1"),
        ({}, dict(precision="fp32"), "precision", "'fp32'", "'fp16'"),
    ],
)
def test_check_manifest_names_the_mismatch(changes, expect, field, expected, found):
    check_manifest(tiny_manifest(), **GOOD)  # type: ignore[arg-type]  # the matching case passes
    with pytest.raises(EngineMismatch) as info:
        check_manifest(tiny_manifest(**changes), **{**GOOD, **expect}, source="tiny.engine")  # type: ignore[arg-type]
    text = str(info.value)
    assert text.startswith("tiny.engine: manifest field " + field)
    assert f"expected {expected}, found {found}" in text


def test_check_manifest_skips_the_shape_when_the_caller_names_none():
    check_manifest(tiny_manifest(), tensorrt_version="11.0.0.114", plugin_version=1)


def test_tensorrt_runner_refuses_an_engine_without_manifest(tmp_path):
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(EngineMismatch, match=r"no manifest tiny\.json beside the engine"):
        TensorRTRunner(engine)


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_runner_without_tensorrt(tmp_path):
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(b"not an engine")
    tiny_manifest(plugin_version=plugin_version()).write(manifest_path(engine))
    with pytest.raises(TensorRTUnavailable, match=r"pip install 'maskstream\[tensorrt\]'"):
        TensorRTRunner(engine)


# ----------------------------------------------------------------------------- make_runner


def test_make_runner_choice_on_this_machine(net, tmp_path):
    local = "torch-cuda" if torch.cuda.is_available() else "torch-cpu"
    assert runner_choice(RunnerSpec()) == local
    assert runner_choice(RunnerSpec(device="cpu")) == "torch-cpu"
    assert runner_choice(RunnerSpec(engine=tmp_path / "x.engine")) == "tensorrt"
    runner = make_runner(RunnerSpec(config=tiny_runner_config(), device="cpu", input_shape=(2, 3, 128, 160)))
    assert isinstance(runner, TorchRunner) and runner.device == "cpu"
    assert runner.input_shape == (2, 3, 128, 160)
    assert not runner.compiled  # compile unset: on for CUDA only (a CPU compile costs more than it gains)
    assert make_runner(RunnerSpec(config=tiny_runner_config(), device="cpu", compile=True)).compiled  # compiles lazily
    with pytest.raises(ValueError, match=r"the caller expects \[1, 3, 128, 160\]"):
        make_runner(RunnerSpec(config=tiny_runner_config(), device="cpu", input_shape=(1, 3, 128, 160)))
    with pytest.raises(EngineMismatch, match="no manifest"):
        make_runner(RunnerSpec(engine=tmp_path / "x.engine"))


# ----------------------------------------------------------------------------- engine build


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_says_what_to_install(tmp_path):
    with pytest.raises(TensorRTUnavailable) as info:
        build_engine(tmp_path / "model.pt", tiny_runner_config(), tmp_path / "tiny.engine")
    assert "TensorRT" in str(info.value) and "pip install 'maskstream[tensorrt]'" in str(info.value)
    assert not (tmp_path / "tiny.engine").exists()


def test_build_engine_rejects_an_unknown_precision(tmp_path):
    with pytest.raises(ValueError, match="precision: expected one of fp32, fp16, got 'int8'"):
        build_engine(tmp_path / "model.pt", tiny_runner_config(), tmp_path / "tiny.engine", precision="int8")  # type: ignore[arg-type]


def test_roi_align_nodes_give_every_plugin_attribute_in_order():
    """The plugin converter reads each RoIAlign node's arguments with the defaults torch.export
    leaves out filled in, in the op's schema order, which the plugin's attributes follow."""
    spec = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    tensors = [i["name"] for i in spec["inputs"]]
    attributes = [a["name"] for a in spec["attributes"]]
    program = export(prepare_static(None, tiny_runner_config(), "fp32"))
    target = torch.ops.maskstream.multiscale_roi_align.default
    nodes = [n for n in program.graph.nodes if n.target is target]
    assert len(nodes) == 2  # box and mask poolers
    sizes = set()
    for node in nodes:
        values = op_arguments(node.target, node.args, node.kwargs)
        assert list(values) == tensors + attributes
        assert {k: values[k] for k in attributes[1:]} == {
            "sampling_ratio": 2, "aligned": False, "canonical_level": 4, "canonical_scale": 224, "first_level": 2,
        }
        sizes.add(values["output_size"])
    assert sizes == {7, 14}
    with pytest.raises(ValueError, match="no value for argument output_size"):
        op_arguments(target, nodes[0].args[:5], {})


# The model parts whose arithmetic a precision sets, by attribute name (in a module path).
PARTS = ("backbone", "rpn", "box_head", "box_predictor", "mask_head", "mask_predictor")


def test_fp16_graph_casts_the_backbone_and_the_mask_branch():
    """fp16 = float16 convolutions in the backbone/FPN and in the mask head + predictor; the RPN,
    the box head, NMS and RoIAlign stay float32, and so does each box's own class's mask logits,
    cast after the class is picked (in RoIHeads.mask_probs, outside any model part)."""
    torch.manual_seed(0)
    program = export(prepare_static(None, tiny_runner_config(), "fp16"))
    dtypes: dict[str, set[torch.dtype]] = {}  # op -> dtype of each call's first input
    by_part: dict[tuple[str, str], set[torch.dtype]] = {}  # (op, model part) -> the same
    casts: list[tuple[str, torch.dtype, torch.dtype]] = []  # (model part, from, to) of float casts
    for node in program.graph.nodes:
        first = node.args[0] if node.op == "call_function" and node.args else None
        if not (isinstance(first, torch.fx.Node) and isinstance(first.meta.get("val"), torch.Tensor)):
            continue
        stack = list(node.meta.get("nn_module_stack", {}).values())
        path = stack[-1][0].split(".") if stack else []
        part = next((name for name in PARTS if name in path), "")
        source = first.meta["val"].dtype
        dtypes.setdefault(str(node.target), set()).add(source)
        by_part.setdefault((str(node.target), part), set()).add(source)
        if str(node.target) == "aten.to.dtype" and source.is_floating_point and source != node.args[1]:
            casts.append((part, source, node.args[1]))
    half, full = {torch.float16}, {torch.float32}
    assert dtypes["aten.conv2d.default"] == half | full
    assert {part for op, part in by_part if op == "aten.conv2d.default"} == {
        "backbone", "rpn", "mask_head", "mask_predictor"}  # the lite box head is fully connected
    for part in ("backbone", "mask_head", "mask_predictor"):
        assert by_part["aten.conv2d.default", part] == half, part
    assert by_part["aten.conv_transpose2d.input", "mask_predictor"] == half
    assert by_part["aten.conv2d.default", "rpn"] == full
    assert dtypes["aten.linear.default"] == full  # box head and predictor
    assert dtypes["maskstream.multiscale_roi_align.default"] == full
    assert dtypes["maskstream.batched_nms_padded.default"] == full
    # The casts in the graph, each where a half region starts or ends (TensorRT compiles these).
    f16, f32 = torch.float16, torch.float32
    assert sorted(casts, key=str) == sorted(
        [("backbone", f32, f16)] + [("backbone", f16, f32)] * 5  # the image in; P2..P6 out
        + [("mask_head", f32, f16), ("", f16, f32)], key=str)  # RoIAligned in; the picked class's logits out


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_cli_build_engine_without_tensorrt_exits_2(tmp_path, capsys):
    code = main(["build-engine", "--checkpoint", str(tmp_path / "model.pt"), "--variant", "lite",
                 "--out", str(tmp_path / "tiny.engine"), "--precision", "fp16"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: build-engine needs TensorRT") and "pip install 'maskstream[tensorrt]'" in err


def test_cli_doctor_lists_every_piece(capsys):
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split("  ")[0].strip() for line in lines]
    assert names == ["torch", "CUDA", "Triton", "TensorRT", "torch-tensorrt", "PyAV", "ZeroMQ", "OpenCV",
                     "pycocotools", "runner", "configs", "leftovers"]
    text = "\n".join(lines)
    row = dict(zip(names, lines))
    assert torch.__version__ in row["torch"]
    if NO_TENSORRT:
        assert row["TensorRT"].endswith("not installed")
    expected = "TorchRunner on cuda" if torch.cuda.is_available() else "TorchRunner on cpu"
    assert expected in row["runner"], text
    assert str(CONFIG_DIR) in row["configs"] and "train/synthetic_lite.yaml" in row["configs"], text


# ----------------------------------------------------------------------------- the stub trap


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="neither TensorRT nor tensorrt-stubs here")
@pytest.mark.skipif(not NO_TENSORRT, reason="a real TensorRT is installed here")
def test_tensorrt_stubs_do_not_count_as_tensorrt():
    import tensorrt  # with tensorrt-stubs: an empty namespace package that imports fine

    assert getattr(tensorrt, "__version__", None) is None
    assert tensorrt_version() is None


def backbone_only_fp16(net):
    """The fp16 graph as it was before the mask branch ran in float16: the backbone's casts only."""
    folded = fold_batch_norms(net)
    folded.backbone = HalfBackbone(folded.backbone)  # type: ignore[assignment]
    return StaticMaskRCNN(folded)


def test_torch_runner_fp16_halves_the_backbone_and_the_mask_branch(net, frames):
    runner = TorchRunner(net, device="cpu", precision="fp16")
    model = runner.static.model
    assert isinstance(model.backbone, HalfBackbone)
    assert isinstance(model.roi_heads.mask_head, HalfMaskHead)
    for part in (model.backbone, model.roi_heads.mask_head, model.roi_heads.mask_predictor):
        assert {p.dtype for p in part.parameters()} == {torch.float16}
    for part in (model.rpn, model.roi_heads.box_head, model.roi_heads.box_predictor):
        assert {p.dtype for p in part.parameters()} == {torch.float32}
    assert {p.dtype for p in net.parameters()} == {torch.float32}  # the caller's model is left alone
    out = runner.infer(*frames)
    fp32 = TorchRunner(net, device="cpu").infer(*frames)
    for name in OUTPUT_NAMES:
        assert out[name].dtype == OUTPUT_DTYPES[name] and out[name].shape == fp32[name].shape, name
    assert (out["num_detections"] == SHAPE.detections).all()
    spec = RunnerSpec(config=tiny_runner_config(), device="cpu", precision="fp16")
    assert make_runner(spec).precision == "fp16"
    assert TorchRunner(prepare_static(None, tiny_runner_config(), "fp16")).precision == "fp16"  # the graph's own casts
    assert TorchRunner(backbone_only_fp16(net)).precision == "fp16"  # told by the backbone


@pytest.fixture(scope="module")
def bundled():
    """A trained model and a batch of scenes it knows (untrained heads' scores are near ties and
    their activations too small for float16 to mean much)."""
    if not BUNDLED_CHECKPOINT.is_file():
        pytest.skip(f"{BUNDLED_CHECKPOINT} not present")
    net = build(config=load_config(ModelConfig, BUNDLED_CONFIG), checkpoint=BUNDLED_CHECKPOINT).eval()
    b, _, h, w = StaticMaskRCNN(net).shape
    return net, scene_batch(b, h, w), np.array([[h, w]] * b, dtype=np.int64)


def assert_same_detections(got: dict[str, np.ndarray], want: dict[str, np.ndarray], box_px: float, score: float,
                           mask: float | None = None) -> None:
    """The same detections per frame, in any order: each of `got`'s matches one of `want`'s with the
    same label, its box within box_px and score within `score` (and mask probabilities within
    `mask`, if given). Order is left out: a different rounding (fused kernels, another device,
    float16) reorders detections whose scores tie, and the untrained tiny model's all do, to the
    last bits (about 1/91 each)."""
    np.testing.assert_array_equal(got["num_detections"], want["num_detections"])
    assert want["num_detections"].min() > 0
    for i, n in enumerate(want["num_detections"]):
        unmatched = list(range(n))
        for k in range(n):
            match = next((j for j in unmatched if got["labels"][i, k] == want["labels"][i, j]
                          and np.abs(got["boxes"][i, k] - want["boxes"][i, j]).max() <= box_px
                          and abs(got["scores"][i, k] - want["scores"][i, j]) <= score), None)
            assert match is not None, f"frame {i}: detection {k} {got['labels'][i, k]} {got['boxes'][i, k]} not found"
            unmatched.remove(match)
            if mask is not None:
                np.testing.assert_allclose(got["mask_probs"][i, k], want["mask_probs"][i, match], atol=mask,
                                           err_msg=f"frame {i} detection {k}")


def test_fp16_finds_what_fp32_finds_with_the_bundled_model(bundled):
    """The same objects, boxes within a pixel, scores within float16's precision."""
    net, images, sizes = bundled
    full = TorchRunner(net, precision="fp32").infer(images, sizes)
    half = TorchRunner(net, precision="fp16").infer(images, sizes)
    assert_same_detections(half, full, box_px=1.0, score=2e-2)
    # Mostly the backbone's float16: 0.03 at most on these scenes (the mask branch's own share: 5e-4).
    n = full["num_detections"]
    for i in range(len(n)):
        np.testing.assert_allclose(half["mask_probs"][i, :n[i]], full["mask_probs"][i, :n[i]], atol=0.1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_fp16_mask_branch_changes_only_the_mask_probs_with_the_bundled_model(bundled, device):
    """The mask head + predictor in float16 leave boxes, scores and labels bit for bit as a graph
    with only the backbone in float16 has them; mask probabilities move by float16 rounding (on
    the CPU 4.6e-4 at most on these scenes). On CUDA two runners are compared to the CUDA graph
    test's 1e-4, and the float32 mask branch it replaces ran in TF32 (inputs rounded to float16's
    10 mantissa bits), so its mask probabilities had rounding of their own."""
    net, images, sizes = bundled
    new = TorchRunner(net, device=device, precision="fp16").infer(images, sizes)
    old = TorchRunner(backbone_only_fp16(net), device=device).infer(images, sizes)
    same, mask = (0.0, 2e-3) if device == "cpu" else (1e-4, 1e-2)
    for name in ("num_detections", "labels"):
        np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    for name in ("boxes", "scores"):  # tolerance 0 on the CPU: equal bit for bit
        np.testing.assert_allclose(new[name], old[name], rtol=same, atol=same, err_msg=name)
    assert old["num_detections"].min() > 0
    np.testing.assert_allclose(new["mask_probs"], old["mask_probs"], atol=mask, rtol=0)
    assert not np.array_equal(new["mask_probs"], old["mask_probs"])  # the mask branch did run in float16


def test_channels_last_changes_only_rounding(bundled):
    net, images, sizes = bundled
    nchw = TorchRunner(net, channels_last=False)
    assert not nchw.channels_last and TorchRunner(net).channels_last  # CPU default: channels_last
    assert_same_detections(TorchRunner(net).infer(images, sizes), nchw.infer(images, sizes), box_px=1e-3, score=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_tf32_sets_torch_flags_and_finds_what_float32_finds(bundled):
    """tf32=False: float32 products in float32; the default (as a TensorRT engine): the same objects.
    The flags are the process's (configure_process); a runner asked for others is refused."""
    net, images, sizes = bundled
    with pytest.raises(ValueError, match=r"call model.runners.configure_process\(tf32=False\)"):
        TorchRunner(net, device="cuda", tf32=False)  # the process is set for TF32 (tf32_process)
    configure_process(tf32=False)
    strict = TorchRunner(net, device="cuda", tf32=False)
    assert not strict.tf32 and not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    full = strict.infer(images, sizes)
    configure_process(tf32=True)
    fast = TorchRunner(net, device="cuda")
    assert fast.tf32 and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    # TF32 rounds products' inputs to float16's 10 mantissa bits: fp16's tolerances.
    assert_same_detections(fast.infer(images, sizes), full, box_px=1.0, score=2e-2)


def test_precision_errors(net):
    with pytest.raises(ValueError, match="precision: expected one of fp32, fp16, got 'int8'"):
        TorchRunner(net, precision="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="this StaticMaskRCNN already has its casts"):
        TorchRunner(StaticMaskRCNN(net), precision="fp16")


def test_nms_score_threshold_for_tensorrt_is_finite_and_keeps_the_same_scores():
    low = nms_score_threshold(float("-inf"))
    assert np.isfinite(np.float32(low)) and low == float(np.finfo(np.float32).min)
    # The op and INMSLayer both keep `score > threshold`: the same verdict on every score the RPN makes.
    scores = np.array([-np.inf, -1e30, -3.0, 0.0, 5.0], dtype=np.float32)
    assert ((scores > np.float32(-np.inf)) == (scores > np.float32(low))).all()
    assert nms_score_threshold(0.05) == 0.05
    with pytest.raises(ValueError, match="score threshold is NaN"):
        nms_score_threshold(float("nan"))
