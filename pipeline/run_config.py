"""`maskstream run`'s settings (mirrored key for key by configs/pipeline.yaml) and the plan they
make: which stage processes, with which configs, wired to which endpoints and rings.

The inference contract (input shape, K, class names, normalisation, precision) is decided once,
in `inference_contract()`: from the engine's manifest with --engine, else from the model config.
Preprocess, inference and postprocess all get that one object; an engine that disagrees with what
was asked for is refused here, before any stage starts.

The default model is chosen in one place, `default_model()`: the bundled trained model when
its weights are present (model/bundled), else the untrained lite variant. Without sources,
`maskstream run` runs `write_sample_clip()`'s generated clip; without outputs, it writes
`default_outputs()` into a folder.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from maskstream.configs import CONFIG_DIR
from maskstream.model.config import ModelConfig
from maskstream.model.contract import InferenceContract
from maskstream.model.runners import RunnerSpec, engine_manifest
from maskstream.pipeline.config import load_config
from maskstream.pipeline.media.sources import Policy, SourceSpec, resolve_policy
from maskstream.pipeline.runtime.shm_ring import Ring
from maskstream.pipeline.runtime.stage import Wiring
from maskstream.pipeline.runtime.supervisor import StageSpec, SupervisorConfig
from maskstream.pipeline.stages import decode, infer, postprocess, preprocess, publish


@dataclass(frozen=True)
class ModelSelection:
    config: Path | None = None  # model YAML; None: default_model()
    checkpoint: Path | None = None  # None with config None: default_model()
    engine: Path | None = None  # a TensorRT engine: TensorRTRunner instead of torch
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch runner: fp16 = backbone + FPN and mask head in float16 (None: fp32); with an engine,
    # checked against its manifest
    precision: Literal["fp32", "fp16"] | None = None
    # torch runner: its forward through torch.compile (inductor fuses bias, ReLU and residual adds into
    # one pass each); the first start compiles (cached on disk after). None: on CUDA, where the faster
    # forward repays the compile; off on a CPU, where it does not. See model.runners.TorchRunner.
    compile: bool | None = None
    seed: int = 0  # initialises whatever no checkpoint covers (same seed, same outputs)
    overrides: tuple[str, ...] = ()  # model config overrides, "roi_heads.score_thresh=0.0"


@dataclass(frozen=True)
class SourceOptions:
    policy: Literal["auto", "offline", "live"] = "auto"  # auto: files offline, cameras/RTSP live
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    stall_timeout_s: float = 5.0
    reconnect_backoff_s: tuple[float, float] = (0.5, 8.0)
    max_reconnects: int | None = 10
    staleness_s: float = 0.5
    rate_fps: float | None = None  # files read live: play at this rate instead of their timestamps
    max_frames: int | None = None  # every source ends after this many frames


@dataclass(frozen=True)
class OutputOptions:
    jsonl: Path | None = None
    coco: Path | None = None
    annotate: Path | None = None  # one stream: this file; several: NAME.<stream id>.SUFFIX
    publish: str | None = None  # e.g. tcp://127.0.0.1:5556
    metrics_port: int | None = None


@dataclass(frozen=True)
class TransportOptions:
    hwm: int = 2  # messages queued per socket side: small keeps live latency and memory bounded
    ring_slots: int = 8
    frame_slot_bytes: int = 1920 * 1080 * 3  # larger frames travel inline
    endpoint_dir: Path | None = None  # ipc:// sockets go in a fresh temporary folder here (None: system temp)


@dataclass(frozen=True)
class InferOptions:
    batch_timeout_s: float = 0.005
    staleness_s: float = 1.0  # live frames older than this at inference are dropped
    threads: int = 0  # torch intra-op threads in the inference process; 0: all cores
    # Keep a batch on the device while the next fills (pipeline/stages/infer.py). None: wherever the
    # runner's submit is asynchronous (torch on CUDA), the only runner where it gains anything.
    overlap: bool | None = None


@dataclass(frozen=True)
class RunConfig:
    sources: tuple[str, ...] = ()
    workers: int = 1  # preprocess and postprocess processes each
    model: ModelSelection = field(default_factory=ModelSelection)
    source: SourceOptions = field(default_factory=SourceOptions)
    outputs: OutputOptions = field(default_factory=OutputOptions)
    transport: TransportOptions = field(default_factory=TransportOptions)
    infer: InferOptions = field(default_factory=InferOptions)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    # Publish skips an offline frame lost with a dead stage once the stream's later frames fill
    # more than every queue could hold (see pipeline.runtime.reorder), or after this long without news.
    gap_timeout_s: float = 300.0


def default_model() -> tuple[Path, Path | None]:
    """(model YAML, checkpoint) used when the run config names neither."""
    from maskstream.model.bundled import BUNDLED_CHECKPOINT, BUNDLED_CONFIG

    if BUNDLED_CHECKPOINT.is_file():
        return BUNDLED_CONFIG, BUNDLED_CHECKPOINT
    return CONFIG_DIR / "model_lite.yaml", None


# The sample clip: the built-in synthetic shapes (what the bundled model was trained on, at the
# training scenes' scale), gliding for two seconds, 16:9 like most cameras, so that it fills the
# bundled model's 320x576 input without padding. Seeded: every run gets the same clip.
SAMPLE_CLIP = {"frames": 50, "seed": 0, "height": 320, "width": 576, "fps": 25, "max_objects": 6}


def write_sample_clip(directory: Path) -> Path:
    """Write the sample clip (and its ground truth, *_annotations.json) into directory; its path."""
    from maskstream.model.synthetic import write_synthetic_clip  # only the demo needs it

    clip, _ = write_synthetic_clip(directory / "sample_clip.mp4", **SAMPLE_CLIP)
    return clip


def has_outputs(outputs: OutputOptions) -> bool:
    return any(v is not None for v in (outputs.jsonl, outputs.coco, outputs.annotate, outputs.publish))


def default_outputs(cfg: RunConfig, directory: Path) -> RunConfig:
    """cfg writing directory/results.jsonl, directory/coco_results.json and, when every source is
    a video file read offline, directory/annotated.mp4 (several streams: annotated.<stream>.mp4)."""
    files = all(_policy(cfg, url) == "offline" and Path(url).is_file() for url in cfg.sources)
    outputs = dataclasses.replace(cfg.outputs, jsonl=directory / "results.jsonl", coco=directory / "coco_results.json",
                                  annotate=directory / "annotated.mp4" if files and cfg.sources else None)
    return dataclasses.replace(cfg, outputs=outputs)


def _policy(cfg: RunConfig, url: str) -> Policy:
    return resolve_policy(url) if cfg.source.policy == "auto" else cfg.source.policy


def model_config(selection: ModelSelection) -> tuple[ModelConfig, Path | None]:
    path, checkpoint = default_model() if selection.config is None else (selection.config, selection.checkpoint)
    if selection.checkpoint is not None:
        checkpoint = selection.checkpoint
    return load_config(ModelConfig, path, selection.overrides), checkpoint


def inference_contract(selection: ModelSelection, model_cfg: ModelConfig) -> InferenceContract:
    """What every stage is built for: the engine's manifest with an engine, else `model_cfg`'s static
    graph. An engine is refused (ContractMismatch, naming the field) when its manifest disagrees with
    what was asked for explicitly: the precision, and a model config or model overrides (without
    them the manifest alone says what the engine takes: the default model's config is nobody's ask)."""
    asked = InferenceContract.from_model_config(model_cfg, selection.precision or "fp32")
    if selection.engine is None:
        return asked
    contract = InferenceContract.from_manifest(engine_manifest(selection.engine))
    source = f"{selection.engine} (manifest)"
    if selection.precision is not None:
        asked.check(contract, source, "--precision", only=("precision",))
    if selection.config is not None or selection.overrides:
        path = selection.config if selection.config is not None else default_model()[0]
        what = f"the model config {path}" + (" with its overrides" if selection.overrides else "")
        asked.check(contract, source, what, ignore=("precision",))
    return contract


def stream_ids(sources: tuple[str, ...]) -> tuple[str, ...]:
    """Readable, unique ids: the file stem (or host) of each source, numbered when they repeat."""
    stems = [Path(url.split("?")[0].rstrip("/")).stem or f"stream{i}" for i, url in enumerate(sources)]
    return tuple(stem if stems.count(stem) == 1 else f"{stem}-{i}" for i, stem in enumerate(stems))


@dataclass
class Plan:
    specs: list[StageSpec]
    reports: str
    streams: tuple[str, ...]
    rings: list[Ring]
    endpoint_dir: Path
    source_specs: dict[str, SourceSpec]

    def close(self) -> None:
        """Remove the rings and socket files (after every stage process has exited)."""
        for ring in self.rings:
            ring.close(unlink=True)
        for path in self.endpoint_dir.iterdir():
            path.unlink(missing_ok=True)
        self.endpoint_dir.rmdir()


def plan(cfg: RunConfig) -> Plan:
    if not cfg.sources:
        raise ValueError("no sources: give --source (repeatable) or `sources:` in the config")
    if cfg.workers < 1:
        raise ValueError(f"workers: expected >= 1, got {cfg.workers}")
    model_cfg, checkpoint = model_config(cfg.model)
    contract = inference_contract(cfg.model, model_cfg)
    height, width = contract.input_hw
    ids = stream_ids(cfg.sources)
    src = cfg.source
    sources = {
        sid: SourceSpec(url, policy=_policy(cfg, url),
                        rtsp_transport=src.rtsp_transport, stall_timeout_s=src.stall_timeout_s,
                        reconnect_backoff_s=src.reconnect_backoff_s, max_reconnects=src.max_reconnects,
                        staleness_s=src.staleness_s, rate_fps=src.rate_fps, max_frames=src.max_frames)
        for sid, url in zip(ids, cfg.sources)
    }
    out = cfg.outputs
    annotate = {sid: _annotate_path(out.annotate, sid, len(ids)) for sid in ids if out.annotate is not None}
    for sid in annotate:
        if sources[sid].policy == "live" or not Path(sources[sid].url).is_file():
            raise ValueError(f"--annotate: source {sources[sid].url!r} is not a video file; annotated videos "
                             "re-decode the source, which a live stream cannot give again")

    directory = Path(tempfile.mkdtemp(prefix="maskstream-", dir=cfg.transport.endpoint_dir))
    tag = f"maskstream-{os.getpid()}-{directory.name.rsplit('-', 1)[-1]}"
    rings: list[Ring] = []

    def endpoint(name: str) -> str:
        return f"ipc://{directory / name}"

    def ring(name: str, slot_bytes: int) -> str:
        rings.append(Ring.create(f"{tag}-{name}", cfg.transport.ring_slots, slot_bytes))
        return rings[-1].name

    try:
        workers = range(cfg.workers)
        pre_in = tuple(endpoint(f"preprocess-{i}") for i in workers)
        post_in = tuple(endpoint(f"postprocess-{i}") for i in workers)
        reports, infer_in, publish_in = endpoint("reports"), endpoint("infer"), endpoint("publish")

        def wiring(stage: str, **kw: object) -> Wiring:
            return Wiring(stage=stage, reports=reports, hwm=cfg.transport.hwm, **kw)  # type: ignore[arg-type]

        live = tuple(sid for sid in ids if sources[sid].policy == "live")
        specs = [
            StageSpec(decode.main, decode.DecodeConfig(sid, sources[sid]),
                      wiring(f"decode.{sid}", outboxes=pre_in,
                             ring=ring(f"decode-{i}", cfg.transport.frame_slot_bytes)),
                      stream_id=sid)
            for i, sid in enumerate(ids)
        ]
        specs += [
            StageSpec(preprocess.main, preprocess.PreprocessConfig(contract),
                      wiring(f"preprocess.{i}", inbox=pre_in[i], outboxes=(infer_in,),
                             ring=ring(f"preprocess-{i}", 3 * height * width)))
            for i in workers
        ]
        runner = RunnerSpec(engine=cfg.model.engine, checkpoint=checkpoint, config=model_cfg, device=cfg.model.device,
                            input_shape=contract.input_shape, precision=cfg.model.precision, compile=cfg.model.compile,
                            seed=cfg.model.seed)
        specs.append(StageSpec(
            infer.main,
            infer.InferConfig(runner, contract, cfg.infer.batch_timeout_s, cfg.infer.staleness_s, live,
                              overlap=cfg.infer.overlap),
            wiring("infer.0", inbox=infer_in, outboxes=post_in, torch_threads=cfg.infer.threads)))
        specs += [
            StageSpec(postprocess.main, postprocess.PostprocessConfig(contract),
                      wiring(f"postprocess.{i}", inbox=post_in[i], outboxes=(publish_in,)))
            for i in workers
        ]
        outputs = tuple(publish.StreamOutput(sid, sid in live, sources[sid].url, annotate.get(sid)) for sid in ids)
        specs.append(StageSpec(
            publish.main,
            publish.PublishConfig(outputs, out.jsonl, out.coco, cfg.gap_timeout_s, _overtake_limit(cfg, len(ids))),
            wiring("publish.0", inbox=publish_in, publish=out.publish)))
    except BaseException:
        for r in rings:
            r.close(unlink=True)
        raise
    return Plan(specs, reports, ids, rings, directory, sources)


def _overtake_limit(cfg: RunConfig, streams: int) -> int:
    """How many later messages of a stream can overtake one of its frames, with room to spare:
    each socket pipe holds up to send + receive HWM, each ring its slots, each process a batch."""
    w, hwm = cfg.workers, cfg.transport.hwm
    pipes = streams * w + 3 * w  # decode->preprocess, preprocess->infer, infer->postprocess, ->publish
    held = 2 * hwm * pipes + cfg.transport.ring_slots * (streams + w) + 64
    return 2 * held


def _annotate_path(path: Path, stream_id: str, count: int) -> Path:
    return path if count == 1 else path.with_name(f"{path.stem}.{stream_id}{path.suffix}")
