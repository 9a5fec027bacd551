"""TensorRT for real: the AOT plugin's registration, a tiny engine, and TensorRTRunner vs TorchRunner.

Skipped where TensorRT is absent (every development machine: its wheels only come from NVIDIA's
index). On a GPU machine with `pip install 'maskstream[tensorrt]'` these are the checks that the
blind-written TensorRT glue (plugin, INMSLayer converter, runner) actually works.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from maskstream.model.engine import build_engine, manifest_path
from maskstream.model.mask_rcnn import build
from maskstream.model.runners import TensorRTRunner, TorchRunner
from maskstream.model.static import OUTPUT_NAMES
from maskstream.plugins.roi_align.registration import PLUGIN_ID, plugin_version, register_plugin
from maskstream.plugins.tensorrt_env import tensorrt_version, torch_tensorrt_version

from tests.tiny_models import SHAPE, tiny_runner_config

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(
        tensorrt_version() is None, reason="TensorRT not installed (its wheels only come from NVIDIA's index)"
    ),
]


def test_register_plugin_is_idempotent_and_has_an_aot_impl():
    register_plugin()
    register_plugin()
    from tensorrt.plugin._lib import QDP_REGISTRY  # private, but what torch-tensorrt's converter reads too

    desc = QDP_REGISTRY[PLUGIN_ID]
    assert desc.aot_impl_func is not None
    assert list(desc.input_tensor_names) == ["p2", "p3", "p4", "p5", "boxes"]
    assert list(desc.input_attrs) == [
        "output_size", "sampling_ratio", "aligned", "canonical_level", "canonical_scale", "first_level",
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plugin_takes_its_attributes_in_registration_order_only():
    """Why model.engine has its own RoIAlign converter: `tensorrt.plugin` refuses attributes out of
    registration order, the order torch-tensorrt's generated converter would pass (defaulted ones
    first, the node's `output_size` last)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    register_plugin()
    net = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_network(0)
    shapes = {"p2": (1, 8, 32, 32), "p3": (1, 8, 16, 16), "p4": (1, 8, 8, 8), "p5": (1, 8, 4, 4), "boxes": (1, 5, 4)}
    tensors = [net.add_input(name, trt.float32, shape) for name, shape in shapes.items()]
    plugin = trtp.op.maskstream.multiscale_roi_align
    attrs = {"output_size": 7, "sampling_ratio": 2, "aligned": False, "canonical_level": 4, "canonical_scale": 224,
             "first_level": 2}
    assert net.add_plugin(plugin(*tensors, **attrs), aot=True) is not None
    generated_order = {**{k: v for k, v in attrs.items() if k != "output_size"}, "output_size": 7}
    with pytest.raises(ValueError, match="Unexpected schema"):
        plugin(*tensors, **generated_order)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(torch_tensorrt_version() is None, reason="torch-tensorrt not installed")
def test_tiny_engine_matches_the_torch_runner(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_runner_config()
    net = build(config=cfg).eval()
    checkpoint = tmp_path / "tiny.pt"
    torch.save(net.state_dict(), checkpoint)
    engine = tmp_path / "tiny.engine"
    manifest = build_engine(checkpoint, cfg, engine, precision="fp32")
    assert engine.is_file() and manifest_path(engine).is_file()
    assert manifest.input_shape == (SHAPE.batch, 3, SHAPE.height, SHAPE.width)
    assert manifest.tensorrt_version == tensorrt_version() and manifest.plugin_version == plugin_version()

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (SHAPE.batch, 3, SHAPE.height, SHAPE.width), dtype=np.uint8)
    sizes = np.array([[SHAPE.height, SHAPE.width], [96, 128]], dtype=np.int64)
    got = TensorRTRunner(engine, input_shape=manifest.input_shape).infer(images, sizes)
    want = TorchRunner(net, device="cpu").infer(images, sizes)
    assert tuple(got) == OUTPUT_NAMES
    for name in OUTPUT_NAMES:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(got["num_detections"], want["num_detections"])
    # TF32 convolutions and unspecified NMS tie order may permute detections whose scores are
    # within noise (untrained heads score every class ~1/91), so compare as sets: sorted scores,
    # and each engine detection has a torch detection of the same label within half a pixel.
    np.testing.assert_allclose(np.sort(got["scores"], 1), np.sort(want["scores"], 1), atol=2e-3, rtol=0)
    for i in range(SHAPE.batch):
        for j in range(int(got["num_detections"][i])):
            same = want["labels"][i] == got["labels"][i, j]
            close = np.abs(want["boxes"][i][same] - got["boxes"][i, j]).max(axis=1) < 0.5
            assert close.any(), f"image {i} detection {j}: no torch detection of label {got['labels'][i, j]} nearby"
