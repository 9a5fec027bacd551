"""`maskstream run`'s settings (mirrored key for key by configs/pipeline.yaml) and the plan they
make: which stage processes, with which configs, wired to which endpoints and rings.

The inference contract (input shape, K, class names, normalisation, precision) is decided once,
in `inference_contract()`: from the engine's manifest with --engine, else from the model config.
Preprocess, inference and postprocess all get that one object; an engine that disagrees with what
was asked for is refused here, before any stage starts.

The model is chosen in one place, `choose_model()`: a named model (`model.name`, model.zoo; its
weights fetched beforehand by `fetch_model()`, the one step that may download), else a checkpoint
with the config beside it or read from its keys, else `default_model()`: the bundled trained model
when its weights are present (model/bundled), else the untrained lite variant. `check_model()`
says whether the checkpoint fits that config before any process starts.

Sources are `URL` or `NAME=URL`; `stream_sources()` gives each its stream id (the rule is in its
docstring). Without sources, `maskstream run` runs `write_sample_clip()`'s generated clip; without
outputs, it writes `default_outputs()` into a folder.

Importing this module loads no torch (the CLI probes sources and reports a bad path before paying
for it); `plan()` and the model functions import what they need.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from maskstream.configs import CONFIG_DIR
from maskstream.model.config import ModelConfig
from maskstream.model.contract import InferenceContract
from maskstream.pipeline.config import dump_config, load_config, loads_config
from maskstream.pipeline.media.sources import Policy, SourceSpec, resolve_policy, source_kind
from maskstream.pipeline.runtime.shm_ring import owner_alive, owner_of, owner_tag, remove_dead_rings
from maskstream.pipeline.runtime.supervisor import StageSpec, SupervisorConfig

if TYPE_CHECKING:
    from maskstream.pipeline.runtime.messages import Limits
    from maskstream.pipeline.runtime.shm_ring import Ring
    from maskstream.pipeline.runtime.transport import CurveServer


@dataclass(frozen=True)
class ModelSelection:
    # a named model (model.zoo.MODELS) or the URL of a checkpoint named name-<sha256 prefix>.pth;
    # its weights are fetched by fetch_model(), its config is its own unless `config` is given
    name: str | None = None
    config: Path | None = None  # model YAML; None: the named model's, model.yaml beside the checkpoint, or its keys
    checkpoint: Path | None = None  # None with name and config None: default_model()
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
    # auto: NVDEC where FFmpeg can open a CUDA device, else the CPU (the reason logged); nvdec: an
    # error where it cannot. Chosen once, when the run is planned (pipeline.media.hwdecode).
    decode: Literal["auto", "cpu", "nvdec"] = "auto"


@dataclass(frozen=True)
class OutputOptions:
    jsonl: Path | None = None
    coco: Path | None = None
    annotate: Path | None = None  # one stream: this file; several: NAME.<stream id>.SUFFIX
    publish: str | None = None  # e.g. tcp://127.0.0.1:5556
    # CurveZMQ for `publish` (both or neither; README: Publishing beyond this host): the publisher's
    # secret key file, and the folder of the public key files of the subscribers let in
    publish_key: Path | None = None
    publish_clients: Path | None = None
    metrics_port: int | None = None


@dataclass(frozen=True)
class TransportOptions:
    hwm: int = 2  # messages queued per socket side: small keeps live latency and memory bounded
    ring_slots: int = 8
    frame_slot_bytes: int = 1920 * 1080 * 3  # larger frames travel inline
    # A source whose frames are taller or wider fails, naming this; the stages' sockets refuse
    # messages larger than frames of this side (and the inference contract's K) allow.
    max_frame_side: int = 4096
    endpoint_dir: Path | None = None  # ipc:// sockets go in a fresh temporary folder here (None: system temp)


@dataclass(frozen=True)
class InferOptions:
    batch_timeout_s: float = 0.005
    staleness_s: float = 1.0  # live frames older than this at inference are dropped
    threads: int = 0  # torch intra-op threads in the inference process; 0: all cores
    # Keep a batch on the device while the next fills (pipeline/stages/infer.py). None: wherever the
    # runner's submit is asynchronous (torch on CUDA), the only runner where it gains anything.
    overlap: bool | None = None
    # Where frames become the model's input: "stage" (the preprocess processes, on the CPU) or
    # "infer" (the inference process, on the runner's device: pipeline.media.gpu_preprocess; the
    # run then has no preprocess stage). auto: infer with the torch runner on CUDA, else stage.
    preprocess: Literal["auto", "stage", "infer"] = "auto"
    # What the inference process sends of each mask: "probs", the mask head's 28x28 probabilities,
    # which the postprocess processes paste into their boxes on the CPU; "crops", pasted and
    # thresholded on the runner's device (model.mask_crops), each instance's binary crop, which
    # postprocess only encodes (pipeline/stages/infer.py). auto: crops with the torch runner on
    # CUDA, else probs. Default probs until the device paste is measured on a GPU
    # (benchmarks/bench_mask_paste.py): on a CPU it only moves the paste from the postprocess
    # processes into the one inference process.
    masks: Literal["auto", "probs", "crops"] = "probs"


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
    files = all(_policy(cfg, url) == "offline" and Path(url).is_file() for _, url in stream_sources(cfg.sources))
    outputs = dataclasses.replace(cfg.outputs, jsonl=directory / "results.jsonl", coco=directory / "coco_results.json",
                                  annotate=directory / "annotated.mp4" if files and cfg.sources else None)
    return dataclasses.replace(cfg, outputs=outputs)


def _policy(cfg: RunConfig, url: str) -> Policy:
    return resolve_policy(url) if cfg.source.policy == "auto" else cfg.source.policy


def fetch_model(selection: ModelSelection, progress: bool = True) -> Path | None:
    """The named model's weights on disk, downloaded now unless cached (model.zoo.fetch; raises
    zoo.DownloadError saying from where, the expected hash and where to put the file by hand);
    None without a name. The one step of a run that may download: plan() never does."""
    if selection.name is None:
        return None
    from maskstream.model import zoo

    check_selection(selection)
    return zoo.fetch(zoo.named_model(selection.name), progress=progress)


def check_selection(selection: ModelSelection) -> None:
    """ValueError when the model flags contradict each other or --model names nothing known."""
    if selection.name is not None and selection.checkpoint is not None:
        raise ValueError(f"--model {selection.name} and --checkpoint {selection.checkpoint} both choose the "
                         "weights: give one of them")
    if selection.name is not None:
        from maskstream.model import zoo

        zoo.named_model(selection.name)


@dataclass(frozen=True)
class ChosenModel:
    """What a ModelSelection means: the config, the checkpoint (None: untrained heads) and, for
    people, where the config came from."""

    config: ModelConfig
    checkpoint: Path | None
    config_from: str


def choose_model(selection: ModelSelection) -> ChosenModel:
    """The config and checkpoint `selection` means (see the module docstring); a named model's
    weights must have been fetched (fetch_model). Raises ValueError (CheckpointError for a
    checkpoint that is no Mask R-CNN this project knows), ConfigError for a bad config."""
    check_selection(selection)
    config_path: Path | None = selection.config
    checkpoint = selection.checkpoint
    if selection.name is not None:
        from maskstream.model import zoo

        named = zoo.named_model(selection.name)
        checkpoint = zoo.cached_path(named)
        if not checkpoint.is_file():
            raise ValueError(f"model {selection.name}: its weights are not in {checkpoint} yet (fetch_model gets them)")
        if config_path is None:
            config_path = named.config
    elif checkpoint is None and config_path is None:
        config_path, checkpoint = default_model()
    if config_path is None:
        assert checkpoint is not None
        beside = checkpoint.parent / "model.yaml"  # what `maskstream train` writes next to its checkpoints
        if beside.is_file():
            config_path = beside
    if config_path is not None:
        return ChosenModel(load_config(ModelConfig, config_path, selection.overrides), checkpoint, str(config_path))
    assert checkpoint is not None
    from maskstream.model.checkpoint import identify, read_state_dict

    identified = identify(read_state_dict(checkpoint), checkpoint)
    cfg = loads_config(ModelConfig, dump_config(identified), selection.overrides, source=f"{checkpoint} (its keys)")
    return ChosenModel(cfg, checkpoint,
                       f"read from the checkpoint's keys: {identified.variant}, {identified.num_classes} classes")


def model_config(selection: ModelSelection) -> tuple[ModelConfig, Path | None]:
    """(model config, checkpoint) of `selection`: choose_model's, without the where-from."""
    chosen = choose_model(selection)
    return chosen.config, chosen.checkpoint


def check_model(chosen: ChosenModel) -> None:
    """CheckpointError, listing what does not fit, unless the checkpoint fits the config key for
    key and shape for shape: in the CLI's process, before any stage starts (the inference stage
    would otherwise find out after every other process is up)."""
    if chosen.checkpoint is None:
        return
    from maskstream.model.checkpoint import check_fits
    from maskstream.model.mask_rcnn import MaskRCNN

    check_fits(MaskRCNN(chosen.config), chosen.checkpoint)


def inference_contract(selection: ModelSelection, model_cfg: ModelConfig) -> InferenceContract:
    """What every stage is built for: the engine's manifest with an engine, else `model_cfg`'s static
    graph. An engine is refused (ContractMismatch, naming the field) when its manifest disagrees with
    what was asked for explicitly: the precision, and a model config or model overrides (without
    them the manifest alone says what the engine takes: the default model's config is nobody's ask)."""
    asked = InferenceContract.from_model_config(model_cfg, selection.precision or "fp32")
    if selection.engine is None:
        return asked
    from maskstream.model.runners import engine_manifest

    contract = InferenceContract.from_manifest(engine_manifest(selection.engine))
    source = f"{selection.engine} (manifest)"
    if selection.precision is not None:
        asked.check(contract, source, "--precision", only=("precision",))
    if selection.config is not None or selection.overrides:
        path = selection.config if selection.config is not None else default_model()[0]
        what = f"the model config {path}" + (" with its overrides" if selection.overrides else "")
        asked.check(contract, source, what, ignore=("precision",))
    return contract


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9_.-]+")


def split_source(source: str) -> tuple[str | None, str]:
    """(name, url) of a `NAME=URL` source, (None, url) of a plain one. NAME is letters, digits and
    `_.-`, so a URL's own `=` (in its query, after `://`) never reads as a name; a file that exists
    under the whole text is that file."""
    name, sep, url = source.partition("=")
    if sep and _NAME.fullmatch(name) and url and not Path(source).exists():
        return name, url
    return None, source


def stream_sources(sources: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(stream id, url) per source, in order. The ids, which are ZeroMQ topics, JSONL stream_id,
    `--stream` of `maskstream subscribe`:

    - `NAME=URL`: NAME (letters, digits, `_.-`; two sources with one name are an error);
    - a file: its name without the suffix (`videos/street.mp4` -> `street`), a device its name
      (`/dev/video0` -> `video0`);
    - a URL: its host and path, without the user, password, port, query and the last suffix
      (`rtsp://admin:pw@10.0.0.5:554/Streaming/Channels/101` -> `10.0.0.5-Streaming-Channels-101`);
    - in every case, each run of other characters than letters, digits and `_.-` becomes `-`;
    - an id taken already (by a name, or an earlier source) gets `-2`, `-3`, ... in source order.

    The same sources in the same order give the same ids, run after run."""
    pairs = [split_source(source) for source in sources]
    names = [name for name, _ in pairs if name is not None]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--source: stream name(s) {', '.join(repeated)} given to more than one source")
    taken = set(names)
    out = []
    for name, url in pairs:
        if name is None:
            base = _id_of(url)
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
            taken.add(name)
        out.append((name, url))
    return tuple(out)


def _id_of(url: str) -> str:
    kind = source_kind(url)
    if kind == "file":
        text = Path(urlsplit(url).path if url.startswith("file:") else url).stem
    elif kind == "device":
        text = Path(url).name
    else:
        parts = urlsplit(url)
        path = parts.path.strip("/")
        if "." in path.rsplit("/", 1)[-1]:
            path = path.rsplit(".", 1)[0]
        text = "-".join(p for p in (parts.hostname or "", path) if p)
    return _NOT_IN_ID.sub("-", text).strip("-.") or "stream"


def stream_ids(sources: tuple[str, ...]) -> tuple[str, ...]:
    """The stream id of each source (stream_sources' rule)."""
    return tuple(sid for sid, _ in stream_sources(sources))


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


@dataclass(frozen=True)
class Leftovers:
    """What remove_dead_runs removed: rings (name, bytes) and socket folders of runs whose owner is gone."""

    rings: tuple[tuple[str, int], ...]
    folders: tuple[Path, ...]
    owners: tuple[int, ...] = ()  # the pids the folders' owner files named

    def __bool__(self) -> bool:
        return bool(self.rings or self.folders)

    def describe(self) -> str:
        owners = sorted({owner[0] for owner in map(owner_of, [name for name, _ in self.rings]) if owner is not None}
                        | set(self.owners))
        megabytes = sum(size for _, size in self.rings) / 1e6
        return (f"{len(self.rings)} shared-memory ring(s) ({megabytes:.1f} MB) and {len(self.folders)} socket "
                f"folder(s) of dead run(s) (pid {', '.join(map(str, owners))})")


OWNER_FILE = "owner"  # in a run's folder: owner_tag() of the process that made it (and removes it)
IPC_PATH_MAX = 107  # bytes of an ipc:// socket path: Linux's sockaddr_un.sun_path, less its terminating NUL


def check_ipc_path(path: Path, what: str, advice: str) -> None:
    """ValueError naming `what` when `path` cannot be an ipc:// socket: checked while planning, since a
    stage that cannot bind its socket fails at every restart."""
    if len(os.fsencode(path)) > IPC_PATH_MAX:
        raise ValueError(f"{what}: the socket path {path} is longer than the {IPC_PATH_MAX} bytes an ipc:// "
                         f"address may have; {advice}")


RUN_FOLDER_PREFIX = "maskstream-"  # remove_dead_runs looks at folders named so
TEMP_NAME_CHARS = 8  # the random part of a tempfile.mkdtemp folder's name


def check_socket_folder(parent: Path | None, prefix: str, names: Sequence[str]) -> None:
    """check_ipc_path for the sockets `names` in a run_folder(parent, prefix) not made yet: a process
    that makes such folders later (a fleet node's runs) refuses a folder too deep at its start,
    not at its first run. ValueError names the path and the limit."""
    # mkdtemp's name: an absolute path from Python 3.12 on; the longer form is the one checked
    folder = Path(os.path.abspath(tempfile.gettempdir() if parent is None else parent))
    for name in names:
        check_ipc_path(folder / f"{prefix}{'x' * TEMP_NAME_CHARS}" / name, "transport.endpoint_dir",
                       "choose a shorter folder")


def worker_sockets(kind: str, workers: int) -> tuple[str, ...]:
    """The names of the sockets of a run's `kind` workers (preprocess, postprocess) in its folder."""
    return tuple(f"{kind}-{i}" for i in range(workers))


def run_sockets(workers: int) -> tuple[str, ...]:
    """Every socket plan() binds in a run's folder."""
    return (*worker_sockets("preprocess", workers), *worker_sockets("postprocess", workers), "reports", "infer",
            "publish")


def check_run_sockets(cfg: RunConfig) -> None:
    """ValueError when the sockets plan(cfg) will bind would be too long for ipc:// (check_socket_folder)."""
    check_socket_folder(cfg.transport.endpoint_dir, RUN_FOLDER_PREFIX, run_sockets(cfg.workers))


def run_folder(parent: Path | None = None, prefix: str = RUN_FOLDER_PREFIX) -> Path:
    """A fresh folder for a run's sockets in `parent` (None: the system's temporary folder), holding an
    OWNER_FILE that names this process, so that remove_dead_runs can tell whether its run is over. The
    owner goes in a file, not in the name: ipc socket paths inside must stay short."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (folder / OWNER_FILE).write_text(owner_tag())
    return folder


def remove_dead_runs(endpoint_dir: Path | None = None) -> Leftovers:
    """Remove what runs killed without a chance to clean up (SIGKILL of the whole process group, a
    power cut of the container) left behind: their shared-memory rings and their socket folders in
    `endpoint_dir` (None: the system's temporary folder), those whose owner process has gone (see
    pipeline.runtime.shm_ring.owner_tag). Live runs, other users' leftovers and other files stay."""
    folders, owners = [], []
    parent = Path(tempfile.gettempdir()) if endpoint_dir is None else endpoint_dir
    try:
        candidates = sorted(parent.iterdir())
    except OSError:
        candidates = []
    for path in candidates:
        if not path.name.startswith(RUN_FOLDER_PREFIX) or path.is_symlink() or not path.is_dir():
            continue
        try:  # a folder without its owner file yet (being made), or not a run's, is none of ours
            owner = owner_of((path / OWNER_FILE).read_text(errors="replace").strip())
        except OSError:
            continue
        if owner is None or owner_alive(*owner):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            folders.append(path)
            owners.append(owner[0])
    return Leftovers(tuple(remove_dead_rings()), tuple(folders), tuple(owners))


def source_specs(cfg: RunConfig) -> dict[str, SourceSpec]:
    """Each stream's SourceSpec, by stream id (stream_sources), policies resolved."""
    src = cfg.source
    return {
        sid: SourceSpec(url, policy=_policy(cfg, url),
                        rtsp_transport=src.rtsp_transport, stall_timeout_s=src.stall_timeout_s,
                        reconnect_backoff_s=src.reconnect_backoff_s, max_reconnects=src.max_reconnects,
                        staleness_s=src.staleness_s, rate_fps=src.rate_fps, max_frames=src.max_frames)
        for sid, url in stream_sources(cfg.sources)
    }


def annotate_paths(cfg: RunConfig) -> dict[str, Path]:
    """The annotated video of each stream (--annotate PATH: one stream PATH, several NAME.<id>.SUFFIX)."""
    ids = stream_ids(cfg.sources)
    path = cfg.outputs.annotate
    return {} if path is None else {sid: _annotate_path(path, sid, len(ids)) for sid in ids}


def output_files(cfg: RunConfig) -> list[Path]:
    """Every file a run of cfg writes (JSONL, COCO results, annotated videos)."""
    return [p for p in (cfg.outputs.jsonl, cfg.outputs.coco, *annotate_paths(cfg).values()) if p is not None]


def plan(cfg: RunConfig, log_level: str = "warning", model: ChosenModel | None = None) -> Plan:
    """The stage processes of a run (nothing started yet); log_level: pipeline.logs' level of
    every stage process; model: choose_model(cfg.model) when the caller has it already. A named
    model's weights must have been fetched (fetch_model)."""
    from maskstream.model.runners import RunnerSpec, runner_choice
    from maskstream.pipeline.media.hwdecode import choose_decoder
    from maskstream.pipeline.runtime.shm_ring import Ring
    from maskstream.pipeline.runtime.stage import Wiring
    from maskstream.pipeline.stages import decode, infer, postprocess, preprocess, publish

    if not cfg.sources:
        raise ValueError("no sources: give --source (repeatable) or `sources:` in the config")
    if cfg.workers < 1:
        raise ValueError(f"workers: expected >= 1, got {cfg.workers}")
    if cfg.transport.max_frame_side < 1:
        raise ValueError(f"transport.max_frame_side: expected >= 1, got {cfg.transport.max_frame_side}")
    if cfg.outputs.publish is not None and cfg.outputs.publish.startswith("ipc://"):
        # Refused rather than bound elsewhere: subscribers connect to the address given. A publish
        # stage that cannot bind it would fail and be restarted until the restart budget runs out.
        check_ipc_path(Path(cfg.outputs.publish.removeprefix("ipc://")), "outputs.publish (--publish)",
                       "choose a shorter path")
    chosen = model or choose_model(cfg.model)
    model_cfg, checkpoint = chosen.config, chosen.checkpoint
    contract = inference_contract(cfg.model, model_cfg)
    height, width = contract.input_hw
    decoder = choose_decoder(cfg.source.decode).decoder  # once per run; a fallback logs its reason
    sources = {sid: dataclasses.replace(spec, decoder=decoder) for sid, spec in source_specs(cfg).items()}
    ids = tuple(sources)
    src = cfg.source
    out = cfg.outputs
    annotate = annotate_paths(cfg)
    runner = RunnerSpec(engine=cfg.model.engine, checkpoint=checkpoint, config=model_cfg, device=cfg.model.device,
                        input_shape=contract.input_shape, precision=cfg.model.precision, compile=cfg.model.compile,
                        seed=cfg.model.seed)
    on_device = preprocess_in_infer(cfg.infer.preprocess, runner_choice(runner))
    crops = masks_in_infer(cfg.infer.masks, runner_choice(runner))
    for sid in annotate:
        if sources[sid].policy == "live" or not Path(sources[sid].url).is_file():
            raise ValueError(f"--annotate: source {sources[sid].url!r} is not a video file; annotated videos "
                             "re-decode the source, which a live stream cannot give again")

    directory = run_folder(cfg.transport.endpoint_dir)
    # Named after this process (the owner, which removes them at the end), so that the rings a killed
    # run leaves are found and removed by the next (remove_dead_runs).
    tag = f"{owner_tag()}-{directory.name.rsplit('-', 1)[-1]}"
    rings: list[Ring] = []

    def endpoint(name: str) -> str:
        path = directory / name
        check_ipc_path(path, "transport.endpoint_dir", "choose a shorter folder")
        return f"ipc://{path}"

    def ring(name: str, slot_bytes: int) -> str:
        rings.append(Ring.create(f"{tag}-{name}", cfg.transport.ring_slots, slot_bytes))
        return rings[-1].name

    try:
        workers = range(cfg.workers)
        pre_in = tuple(map(endpoint, worker_sockets("preprocess", cfg.workers)))
        post_in = tuple(map(endpoint, worker_sockets("postprocess", cfg.workers)))
        reports, infer_in, publish_in = endpoint("reports"), endpoint("infer"), endpoint("publish")

        def wiring(stage: str, **kw: object) -> Wiring:
            return Wiring(stage=stage, reports=reports, hwm=cfg.transport.hwm, log_level=log_level,
                          **kw)  # type: ignore[arg-type]

        def limits(kind: str) -> Limits:
            return dataclasses.replace(message_limits(cfg, contract, ids), kinds=(kind, "EndOfStream"),
                                       raw_masks="crops" if crops else "probs")

        live = tuple(sid for sid in ids if sources[sid].policy == "live")
        specs = [
            StageSpec(decode.main, decode.DecodeConfig(sid, sources[sid], max_frame_side=cfg.transport.max_frame_side),
                      wiring(f"decode.{sid}", outboxes=(infer_in,) if on_device else pre_in,
                             ring=ring(f"decode-{i}", cfg.transport.frame_slot_bytes)),
                      stream_id=sid, offline=sid not in live)
            for i, sid in enumerate(ids)
        ]
        frame_rings = tuple(r.name for r in rings)
        if not on_device:  # else the inference process makes the model's input from decode's frames
            specs += [
                StageSpec(preprocess.main, preprocess.PreprocessConfig(contract),
                          wiring(f"preprocess.{i}", inbox=pre_in[i], outboxes=(infer_in,),
                                 ring=ring(f"preprocess-{i}", 3 * height * width), limits=limits("Frame"),
                                 reads=frame_rings),
                          reads=frame_rings)
                for i in workers
            ]
        input_rings = frame_rings if on_device else tuple(r.name for r in rings[len(frame_rings):])
        post_config = postprocess.PostprocessConfig(contract)
        specs.append(StageSpec(
            infer.main,
            # with crops, the masks are thresholded in infer: at postprocess's threshold, one value
            infer.InferConfig(runner, contract, cfg.infer.batch_timeout_s, cfg.infer.staleness_s, live,
                              overlap=cfg.infer.overlap, frames=on_device, crops=crops,
                              mask_threshold=post_config.mask_threshold),
            wiring("infer.0", inbox=infer_in, outboxes=post_in, torch_threads=cfg.infer.threads,
                   limits=limits("Frame" if on_device else "ModelInput"), reads=input_rings), reads=input_rings))
        specs += [
            StageSpec(postprocess.main, post_config,
                      wiring(f"postprocess.{i}", inbox=post_in[i], outboxes=(publish_in,),
                             limits=limits("RawDetections")))
            for i in workers
        ]
        outputs = tuple(publish.StreamOutput(sid, sid in live, sources[sid].url, annotate.get(sid), src.max_frames)
                        for sid in ids)
        # The journal (docs/delivery.md) is the --out JSONL, or a file of its own in the run's folder.
        journal = out.jsonl if out.jsonl is not None else directory / "journal.jsonl"
        curve = publish_curve(out)
        specs.append(StageSpec(
            publish.main, publish.PublishConfig(outputs, journal, out.coco),
            wiring("publish.0", inbox=publish_in, publish=out.publish, limits=limits("Detections"),
                   publish_curve=curve)))
    except BaseException:
        for r in rings:
            r.close(unlink=True)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return Plan(specs, reports, ids, rings, directory, sources)


def preprocess_in_infer(preprocess: str, runner: str) -> bool:
    """Whether the inference process makes the model's input (infer.preprocess, for the runner
    model.runners.runner_choice names); ValueError where that runner cannot."""
    if preprocess not in ("auto", "stage", "infer"):
        raise ValueError(f"infer.preprocess: expected auto, stage or infer, got {preprocess!r}")
    if preprocess == "infer" and runner == "tensorrt":
        raise ValueError("infer.preprocess: infer needs the torch runner (the TensorRT runner takes the "
                         "preprocess stage's inputs): use stage or auto")
    return preprocess == "infer" or (preprocess == "auto" and runner == "torch-cuda")


def masks_in_infer(masks: str, runner: str) -> bool:
    """Whether the inference process pastes the masks and sends their crops (infer.masks, for the
    runner model.runners.runner_choice names)."""
    if masks not in ("auto", "probs", "crops"):
        raise ValueError(f"infer.masks: expected auto, probs or crops, got {masks!r}")
    return masks == "crops" or (masks == "auto" and runner == "torch-cuda")


def message_limits(cfg: RunConfig, contract: InferenceContract, streams: tuple[str, ...]) -> Limits:
    """What the run's messages may hold (each stage's inbox adds the kinds it takes): every message
    is checked against these before use, and they size the sockets' ZMQ_MAXMSGSIZE."""
    from maskstream.pipeline.runtime.messages import Limits

    return Limits(streams=streams, max_frame_side=cfg.transport.max_frame_side, input_hw=contract.input_hw,
                  detections=contract.detections, class_names=contract.class_names, same_host=True)


def publish_curve(outputs: OutputOptions) -> CurveServer | None:
    """The publisher's CurveZMQ keys, checked (ValueError naming the key or folder), or None."""
    if outputs.publish_key is None and outputs.publish_clients is None:
        return None
    if outputs.publish_key is None or outputs.publish_clients is None:
        raise ValueError("outputs.publish_key (--publish-key) and outputs.publish_clients (--publish-clients) go "
                         "together: the publisher's secret key, and the public keys of the subscribers let in")
    if outputs.publish is None:
        raise ValueError("outputs.publish_key: CurveZMQ keys, but nothing is published (no --publish)")
    from maskstream.pipeline.runtime.transport import curve_server  # zmq: only where keys are given

    return curve_server(outputs.publish_key, outputs.publish_clients)


_LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")


def publish_exposure(endpoint: str) -> str | None:
    """Where beyond this host a publish endpoint can be reached: "every network interface", "ADDRESS";
    None for loopback tcp and for ipc/inproc, which no other host reaches."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return None
    host = address.rsplit(":", 1)[0] if transport == "tcp" else address
    if host in ("*", "0.0.0.0", "::", "[::]", "[*]"):
        return "every network interface"
    if transport == "tcp" and (host in _LOOPBACK_HOSTS or host.startswith("127.")):
        return None
    return host or endpoint


def _annotate_path(path: Path, stream_id: str, count: int) -> Path:
    return path if count == 1 else path.with_name(f"{path.stem}.{stream_id}{path.suffix}")
