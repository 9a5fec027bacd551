"""Where a runner's forward spends its time: per model stage, per custom op, per kernel.

One torch.profiler pass over `calls` eager forwards of the runner's own module (the CUDA graph
replays exactly these kernels; eager only adds launch gaps between them, which the device
times below do not count). Stages are timed by profiler ranges pushed from forward hooks on
the model's parts; the custom ops (RoIAlign, NMS) are found by name and charged to the stage
they ran in, so the RPN's NMS and the box head's NMS come apart.

Times are device (kernel) times on CUDA and CPU times on a CPU, in ms per forward:
- stages: body, fpn, rpn, box_head, box_predictor, mask_head, mask_predictor, and "other"
  (the forward's total minus those: normalisation, RoIAlign, box decoding and detection NMS,
  mask gathering); also each stage's span ("span_ms"): on CUDA between two CUDA events (kernels
  plus the gaps where the device waited for eager launches), on a CPU its wall time. Spans need
  no CUPTI: where the profiler sees no kernels (CUPTI unavailable, as it may be in a sandbox),
  they remain;
- ops: each custom op under each stage it ran in;
- kernels: the `top` kernels (CPU: aten ops) by self time.

    from runner_profile import profile_forward      # benchmarks/, beside bench_cuda_runner.py
    report = profile_forward(runner.static, images, sizes, calls=3)
    report = profile_forward(runner.static, images, sizes, forward=runner._forward)  # compiled: no stages
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from maskstream.model.static import StaticMaskRCNN
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

# Model parts timed as stages, by attribute name (unique in MaskRCNN, whether or not wrapped in
# HalfBackbone or HalfMaskHead).
STAGES = ("body", "fpn", "rpn", "box_head", "box_predictor", "mask_head", "mask_predictor")
CUSTOM_OPS = ("maskstream::multiscale_roi_align", "maskstream::batched_nms_padded")
_PREFIX = "stage/"
_FORWARD = _PREFIX + "forward"


def stage_modules(model: nn.Module) -> dict[str, nn.Module]:
    """STAGES -> the module of that name in `model`; an error names any stage not found exactly once."""
    found: dict[str, list[nn.Module]] = {name: [] for name in STAGES}
    for path, module in model.named_modules():
        last = path.rsplit(".", 1)[-1]
        if last in found:
            found[last].append(module)
    wrong = {name: len(mods) for name, mods in found.items() if len(mods) != 1}
    if wrong:
        raise ValueError(f"profile: each stage must name one module of the model; found {wrong}")
    return {name: mods[0] for name, mods in found.items()}


def _mark(cuda: bool) -> Any:
    """Now: a CUDA event recorded on the current stream (the device's timeline), or perf_counter()."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_ms(start: Any, end: Any) -> float:
    """ms between two marks; for CUDA events, once the device has passed `end`."""
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else (end - start) * 1e3


@contextmanager
def _stage_ranges(model: nn.Module, spans: dict[str, list[tuple[Any, Any]]], cuda: bool) -> Iterator[None]:
    """Push a profiler range `stage/<name>` around each stage module's forward, and append its
    (start, end) marks to spans[name]."""
    open_ranges: dict[str, tuple[record_function, Any]] = {}

    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            scope = record_function(_PREFIX + name)
            scope.__enter__()
            open_ranges[name] = (scope, _mark(cuda))
        return hook

    def leave(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            scope, start = open_ranges.pop(name)
            spans[name].append((start, _mark(cuda)))
            scope.__exit__(None, None, None)
        return hook

    handles = []
    for name, module in stage_modules(model).items():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave(name))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _enclosing_stage(event: Any) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(_PREFIX) and parent.name != _FORWARD:
            return parent.name[len(_PREFIX):]
        parent = parent.cpu_parent
    return "other"


def _kernels(averages: Any, cuda: bool) -> list[Any]:
    """The profiler's averages that are kernels: on CUDA the events that ran on the device, on a CPU
    the aten ops. Never a profiler range: on CUDA each range (our stage/* ones included) also comes
    back as a device event (Kineto's gpu_user_annotation, DeviceType.CUDA, as long as the kernels
    it spans), which torch's own tables leave out of device time by its is_user_annotation."""
    if not cuda:
        return [a for a in averages if not a.key.startswith(_PREFIX)]
    return [a for a in averages if a.self_device_time_total > 0
            and getattr(a, "device_type", None) != torch.autograd.DeviceType.CPU
            and not getattr(a, "is_user_annotation", False) and not a.key.startswith(_PREFIX)]


def profile_forward(static: StaticMaskRCNN, images: torch.Tensor, sizes: torch.Tensor, calls: int = 3,
                    top: int = 15, forward: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Profile `calls` forwards of `static` on inputs already on its device.

    forward: what to call instead of `static` itself, e.g. the runner's torch.compile'd forward.
    Its report has no stages (inductor's fused kernels belong to no one module, and module hooks
    do not run inside a compiled graph): only the total, the custom ops and the kernels."""
    cuda = images.is_cuda
    by_stage = forward is None
    run = static if forward is None else forward
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def spent(event: Any, total: bool = True) -> float:  # ms, device time on CUDA, CPU time on a CPU
        if cuda:
            return (event.device_time_total if total else event.self_device_time_total) / 1e3
        return (event.cpu_time_total if total else event.self_cpu_time_total) / 1e3

    spans: dict[str, list[tuple[Any, Any]]] = {name: [] for name in (*STAGES, "forward")}
    hooks = _stage_ranges(static.model, spans, cuda) if by_stage else nullcontext()
    with torch.inference_mode(), hooks:
        run(images, sizes)  # lazy initialisation stays out of the profile
        for pairs in spans.values():  # in place: the hooks hold this dict
            pairs.clear()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(calls):
                with record_function(_FORWARD):
                    start = _mark(cuda)
                    run(images, sizes)
                    spans["forward"].append((start, _mark(cuda)))
            if cuda:
                torch.cuda.synchronize()
    span_ms = {name: sum(_elapsed_ms(*pair) for pair in pairs) / calls for name, pairs in spans.items()}

    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    total = sum(spent(e) for e in events if e.name == _FORWARD) / calls
    stages = {name: 0.0 for name in STAGES} if by_stage else {}
    ops: dict[tuple[str, str], float] = {}
    for event in events:
        if event.name.startswith(_PREFIX) and event.name != _FORWARD:
            stages[event.name[len(_PREFIX):]] += spent(event) / calls
        elif event.name in CUSTOM_OPS:
            key = (_enclosing_stage(event), event.name.split("::")[1])
            ops[key] = ops.get(key, 0.0) + spent(event) / calls
    if by_stage:
        stages["other"] = total - sum(stages.values())
        span_ms["other"] = span_ms["forward"] - sum(span_ms[name] for name in STAGES)

    kernels = _kernels(prof.key_averages(), cuda)
    kernels.sort(key=lambda a: spent(a, total=False), reverse=True)
    return {
        "calls": calls,
        "time": "device (kernel) time" if cuda else "CPU time",
        "total_ms": total,
        "span": "CUDA events" if cuda else "wall time",
        "span_total_ms": span_ms["forward"],
        "stages": [{"stage": name, "ms": ms, "share": ms / total if total > 0 else 0.0, "span_ms": span_ms[name]}
                   for name, ms in stages.items()],
        "ops": [{"stage": stage, "op": op, "ms": ms} for (stage, op), ms in sorted(ops.items())],
        "kernels": [{"name": a.key, "ms": spent(a, total=False) / calls, "count": a.count / calls}
                    for a in kernels[:top]],
    }


def format_profile(report: dict[str, Any]) -> str:
    """The report as three small tables."""
    lines = [f"per forward, {report['time']}, mean of {report['calls']}: total {report['total_ms']:.2f} ms "
             f"(span, {report['span']}: {report['span_total_ms']:.2f} ms)"]
    if report["stages"]:
        lines += [f"  {'stage':<16} {'ms':>8} {'share':>6} {'span ms':>8}"]
        lines += [f"  {s['stage']:<16} {s['ms']:>8.2f} {s['share']:>6.1%} {s['span_ms']:>8.2f}"
                  for s in report["stages"]]
    lines += [f"  {'op (in stage)':<40} {'ms':>8}"]
    lines += [f"  {o['op'] + ' (' + o['stage'] + ')':<40} {o['ms']:>8.2f}" for o in report["ops"]]
    lines += [f"  {'kernel':<70} {'ms':>8} {'count':>6}"]
    lines += [f"  {k['name'][:70]:<70} {k['ms']:>8.3f} {k['count']:>6.0f}" for k in report["kernels"]]
    return "\n".join(lines)
