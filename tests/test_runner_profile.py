"""pipeline/bench/runner_profile.py: the per-stage profile bench_cuda_runner.py --profile records (CPU here)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from maskstream.model.mask_rcnn import build
from maskstream.model.static import StaticMaskRCNN, with_precision
from maskstream.pipeline.bench import runner_profile
from torch import nn

from tests.tiny_models import SHAPE, tiny_runner_config


def assert_kernels_within(report):
    """The kernel table (CPU: aten ops by self time) holds ops that ran, largest first, the
    convolutions on top, and their self times fit in the forwards they ran in."""
    kernels = report["kernels"]
    assert kernels and all(k["ms"] > 0 and k["count"] > 0 for k in kernels)
    assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
    assert "conv" in kernels[0]["name"], kernels[0]
    assert sum(k["ms"] for k in kernels) <= report["total_ms"]


@pytest.fixture(scope="module")
def tiny_static():
    torch.manual_seed(0)
    return StaticMaskRCNN(build(config=tiny_runner_config()).eval(), SHAPE).eval()


def test_profile_charges_every_stage_and_the_custom_ops_to_where_they_ran(tiny_static):
    report = runner_profile.profile_forward(tiny_static, *tiny_static.example_inputs(), calls=2)
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == [*runner_profile.STAGES, "other"]
    assert all(stages[name]["ms"] > 0 for name in runner_profile.STAGES)
    # The stages and "other" partition the forward (other = total - stages): "other" holds real work
    # (normalisation, RoIAlign, box decoding, the detection NMS), so a stage counted twice, or a
    # total short of its stages, leaves it at or below zero.
    assert stages["other"]["ms"] > 0
    assert sum(s["share"] for s in report["stages"]) == pytest.approx(1.0)
    ops = {(o["stage"], o["op"]) for o in report["ops"]}
    # The RPN's NMS runs inside the rpn module; RoIAlign and the detection NMS in RoIHeads' own code.
    assert ops == {("rpn", "batched_nms_padded"), ("other", "batched_nms_padded"), ("other", "multiscale_roi_align")}
    # An op's time is part of the time of the stage it is charged to.
    for name in ("rpn", "other"):
        charged = [o["ms"] for o in report["ops"] if o["stage"] == name]
        assert all(ms > 0 for ms in charged) and sum(charged) <= stages[name]["ms"], (name, charged)
    # Spans (wall time here, CUDA events on a GPU): measured per stage, each within the forward's.
    assert report["span"] == "wall time"
    assert all(0 < stages[name]["span_ms"] < report["span_total_ms"] for name in runner_profile.STAGES)
    assert stages["other"]["span_ms"] > 0
    # On a CPU the profiler's times and the spans are two clocks on the same calls: they agree, per
    # forward (a total not divided by the calls would be twice its span) and per stage.
    assert report["total_ms"] == pytest.approx(report["span_total_ms"], rel=0.2)
    for name in runner_profile.STAGES:
        assert stages[name]["ms"] == pytest.approx(stages[name]["span_ms"], rel=0.25, abs=2.0), name
    assert_kernels_within(report)
    assert "total" in runner_profile.format_profile(report)
    # The hooks are gone afterwards: a later forward pays nothing for the profile.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_static.modules())


def test_profile_of_another_forward_has_its_ops_and_kernels_but_no_stages(tiny_static):
    """A compiled forward (any callable in its place) is profiled whole: the total, the custom ops
    and the kernels; no stage hooks are placed."""
    calls = []

    def forward(images, sizes):
        calls.append(1)
        return tiny_static(images, sizes)

    report = runner_profile.profile_forward(tiny_static, *tiny_static.example_inputs(), calls=2, forward=forward)
    assert len(calls) == 3  # one warm-up, two profiled
    assert report["stages"] == [] and report["total_ms"] > 0 and report["kernels"]
    assert {o["op"] for o in report["ops"]} == {"batched_nms_padded", "multiscale_roi_align"}
    assert report["total_ms"] == pytest.approx(report["span_total_ms"], rel=0.2)
    assert all(o["ms"] > 0 for o in report["ops"]) and sum(o["ms"] for o in report["ops"]) < report["total_ms"]
    assert_kernels_within(report)
    text = runner_profile.format_profile(report)
    assert "total" in text and "stage " not in text


def test_stage_modules_found_through_the_fp16_wrapper(tiny_static):
    half = with_precision(build(config=tiny_static.model.cfg).eval(), "fp16")
    assert set(runner_profile.stage_modules(half)) == set(runner_profile.STAGES)


def test_stage_modules_names_the_missing_stages():
    with pytest.raises(ValueError, match="'body': 0.*'mask_predictor': 0"):
        runner_profile.stage_modules(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_cuda_kernel_list_leaves_out_profiler_ranges():
    """On CUDA every record_function range also comes back as a device event (Kineto's
    gpu_user_annotation, DeviceType.CUDA, as long as the kernels it spans): stage/forward would
    otherwise head the kernel table. Stand-ins for torch's FunctionEventAvg, as a GPU run gives them."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def avg(key, device_type, self_us, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_us,
                               is_user_annotation=annotation)

    averages = [avg("stage/forward", cuda, 9000, annotation=True), avg("stage/body", cuda, 5000, annotation=True),
                avg("nccl:other_range", cuda, 700, annotation=True), avg("roi_align_kernel", cuda, 300),
                avg("aten::conv2d", cpu, 4000), avg("idle_kernel", cuda, 0)]
    assert [a.key for a in runner_profile._kernels(averages, cuda=True)] == ["roi_align_kernel"]
