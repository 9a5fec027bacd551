"""Training loop: SGD with warm-up and a step or cosine schedule, checkpoints and resume,
a metrics log (CSV + JSONL) and a PNG of the loss curves.

    result = train(cfg, model_cfg, progress=print_record)

`TrainConfig` is mirrored key for key by configs/train/*.yaml (the CLI loads it, together
with the ModelConfig file it names, and passes both in). The inputs a file names are relative
to that file (`resolve_paths`), so a config works from any directory and from an installed wheel.

Every random choice of iteration i (which samples, flips, scales, the RPN/RoI sampling) derives
from (seed, i) alone, so a run is reproducible on the CPU and a resumed run continues exactly as
an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from maskstream.configs import CONFIG_DIR
from maskstream.model.checkpoint import CheckpointError, load_weights, read_state_dict
from maskstream.model.config import ModelConfig
from maskstream.model.datasets import Dataset, DatasetError, DatasetSpec, Sample, open_dataset
from maskstream.model.mask_rcnn import MaskRCNN, load_imagenet_backbone
from maskstream.model.plot import write_loss_plot
from torch import Tensor, nn

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.")
MAX_CONSECUTIVE_BAD_SAMPLES = 20


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelSource:
    # a ModelConfig YAML (loaded by the CLI); default: the shipped one the bundled model was trained with
    config: Path = field(default_factory=lambda: CONFIG_DIR / "model_lite_shapes.yaml")
    overrides: tuple[str, ...] = ()  # `key=value` overrides applied to it, as `--set`
    # "imagenet": the ImageNet backbone (lite: MobileNetV2), heads from scratch; "none": all
    # from scratch; anything else: a Mask R-CNN checkpoint path (predictors replaced when the
    # number of classes differs).
    init: str = "imagenet"


@dataclass(frozen=True)
class DataConfig:
    train: DatasetSpec = field(default_factory=lambda: DatasetSpec(format="synthetic"))
    val: DatasetSpec | None = None


@dataclass(frozen=True)
class SolverConfig:
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001  # lr multiplier at iteration 0, rising linearly to 1
    schedule: Literal["step", "cosine"] = "cosine"
    steps: tuple[int, ...] = ()  # step schedule: iterations where lr is multiplied by gamma
    gamma: float = 0.1
    max_iters: int = 1000
    batch_size: int = 2
    clip_grad_norm: float | None = 10.0  # max global gradient norm; null = no clipping


@dataclass(frozen=True)
class AugmentConfig:
    hflip_prob: float = 0.5
    # The model's transform.min_size (and max_size) times a factor drawn uniformly from here.
    scale_range: tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSource = field(default_factory=ModelSource)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    output_dir: Path = Path("runs/train")  # relative to the working directory, unlike the inputs
    seed: int = 0
    checkpoint_every: int = 500  # also at the last iteration
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch CPU threads, set by the CLI; 0 = torch's default

    def __post_init__(self) -> None:
        s = self.solver
        if s.max_iters < 1 or s.batch_size < 1 or s.warmup_iters < 0 or self.checkpoint_every < 1:
            raise ValueError("solver.max_iters, solver.batch_size and checkpoint_every must be >= 1, warmup_iters >= 0")
        if s.lr <= 0:
            raise ValueError(f"solver.lr: expected > 0, got {s.lr}")
        if list(s.steps) != sorted(s.steps):
            raise ValueError(f"solver.steps: expected increasing iterations, got {list(s.steps)}")
        lo, hi = self.augment.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"augment.scale_range: expected 0 < low <= high, got {[lo, hi]}")
        if not 0 <= self.augment.hflip_prob <= 1:
            raise ValueError(f"augment.hflip_prob: expected a probability, got {self.augment.hflip_prob}")


_INIT_KEYWORDS = ("imagenet", "none")


def resolve_paths(cfg: TrainConfig, base: Path) -> TrainConfig:
    """cfg with the relative inputs it names (model.config, a checkpoint in model.init, each
    dataset's path and images) taken as relative to `base`, the folder of the YAML file that named
    them. output_dir stays relative to the working directory: a run writes where it is started,
    never beside a config that may lie inside an installed package."""

    def under(path: Path) -> Path:
        return path if path.is_absolute() else Path(os.path.normpath(base / path))

    def spec(s: DatasetSpec) -> DatasetSpec:
        return dataclasses.replace(s, path=s.path and under(s.path), images=s.images and under(s.images))

    init = cfg.model.init if cfg.model.init in _INIT_KEYWORDS else str(under(Path(cfg.model.init)))
    model = dataclasses.replace(cfg.model, config=under(cfg.model.config), init=init)
    data = DataConfig(spec(cfg.data.train), None if cfg.data.val is None else spec(cfg.data.val))
    return dataclasses.replace(cfg, model=model, data=data)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class IterationRecord:
    iteration: int  # 1-based: iterations done so far
    max_iters: int
    lr: float
    losses: dict[str, float]
    total_loss: float
    seconds: float  # wall time of this iteration, data included
    data_seconds: float
    images_per_second: float
    skipped_samples: int  # unreadable images skipped so far


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    iterations: int
    wall_seconds: float  # this invocation
    cpu_seconds: float  # process CPU time of this invocation (all threads)
    last_losses: dict[str, float]
    skipped_samples: int


# --------------------------------------------------------------------------- pieces


def learning_rate(solver: SolverConfig, iteration: int) -> float:
    """lr for 0-based `iteration`: linear warm-up, then step decay or a cosine to zero."""
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        warmup = solver.warmup_factor * (1 - alpha) + alpha
    else:
        warmup = 1.0
    if solver.schedule == "step":
        decay = solver.gamma ** sum(1 for s in solver.steps if iteration >= s)
    else:
        decay = 0.5 * (1 + math.cos(math.pi * iteration / solver.max_iters))
    return solver.lr * warmup * decay


def init_model(model: MaskRCNN, init: str) -> None:
    """Starting weights: see ModelSource.init."""
    if init == "none":
        return
    if init == "imagenet":
        load_imagenet_backbone(model)
        return
    state = read_state_dict(init)
    own = model.state_dict()
    predictor_keys = [k for k in own if k.startswith(PREDICTOR_PREFIXES)]
    if any(k in state and state[k].shape != own[k].shape for k in predictor_keys):
        # Fine-tuning to another number of classes: keep everything but the predictors,
        # which start from the fresh initialisation of `model`.
        state = {k: v for k, v in state.items() if not k.startswith(PREDICTOR_PREFIXES)}
        state.update({k: own[k] for k in predictor_keys})
    load_weights(model, state, what=f"init checkpoint {init}")


def seeded_generator(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


class SampleOrder:
    """Global sample k -> dataset index: epoch k // N in a permutation drawn from (seed, epoch)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, k: int) -> int:
        epoch = k // self.size
        if epoch not in self._cache:
            self._cache = {epoch: seeded_generator(self.seed, 1, epoch).permutation(self.size)}
        return int(self._cache[epoch][k % self.size])


def to_target(sample: Sample, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    image = torch.from_numpy(np.array(sample.image)).to(device).permute(2, 0, 1).float() / 255
    target = {
        "boxes": torch.from_numpy(np.array(sample.boxes, np.float32)).reshape(-1, 4).to(device),
        "labels": torch.from_numpy(np.array(sample.labels, np.int64)).to(device),
        "masks": torch.from_numpy(np.array(sample.masks, np.uint8)).to(device),
    }
    return image, target


def hflip(sample: Sample) -> Sample:
    w = sample.image.shape[1]
    boxes = np.array(sample.boxes, np.float32).reshape(-1, 4)
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return dataclasses.replace(
        sample, image=sample.image[:, ::-1], boxes=flipped, masks=np.asarray(sample.masks)[:, :, ::-1]
    )


@contextlib.contextmanager
def training_scale(model: MaskRCNN, factor: float) -> Iterator[None]:
    """Scale augmentation: the model's own resize targets `factor` times its configured size
    for one step (the eager transform reads model.cfg.transform on every call)."""
    original = model.cfg
    if factor != 1.0:
        t = original.transform
        size = dataclasses.replace(t, min_size=round(t.min_size * factor), max_size=round(t.max_size * factor))
        model.cfg = dataclasses.replace(original, transform=size)
    try:
        yield
    finally:
        model.cfg = original


# --------------------------------------------------------------------------- loop


def check_classes(model_cfg: ModelConfig, dataset: Dataset, what: str) -> None:
    if model_cfg.num_classes != len(dataset.class_names):
        raise ValueError(
            f"{what}: the dataset has {len(dataset.class_names) - 1} categories "
            f"({', '.join(dataset.class_names[1:])}), "
            f"so the model needs num_classes={len(dataset.class_names)} (background included), "
            f"it has {model_cfg.num_classes}"
        )


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' asked for, but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def train(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    *,
    resume: bool = False,
    progress: Callable[[IterationRecord], None] | None = None,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Train from `cfg.model.init` (or the last checkpoint in output_dir with `resume`).

    Writes into cfg.output_dir: last.pt (model, optimizer, iteration), model_final.pt
    (weights only), metrics.csv, metrics.jsonl, loss_curves.png. `dataset` replaces
    cfg.data.train (tests). Skipped samples are counted in the records, never raised,
    unless MAX_CONSECUTIVE_BAD_SAMPLES in a row fail (then the data is broken: DatasetError).
    """
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    device = pick_device(cfg.device)
    data = dataset if dataset is not None else open_dataset(cfg.data.train)
    check_classes(model_cfg, data, "data.train")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    previous_determinism = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN (to expose reads of uninitialised
    # memory): ~2,500 fills per iteration, 12% of a CPU step. Our ops write what they allocate,
    # and the identical-losses test would catch one that did not.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    try:
        torch.manual_seed(cfg.seed)  # the initial weights of the heads
        model = MaskRCNN(model_cfg)
        start = 0
        last = out / "last.pt"
        if resume:
            if not last.is_file():
                raise CheckpointError(f"--resume: {last} does not exist (nothing to resume in {out})")
            state = torch.load(last, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            start = int(state["iteration"])
        else:
            init_model(model, cfg.model.init)
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            params, lr=cfg.solver.lr, momentum=cfg.solver.momentum, weight_decay=cfg.solver.weight_decay
        )
        use_amp = device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        if resume:
            optimizer.load_state_dict(state["optimizer"])
            if use_amp and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
        log = MetricsLog(out, keep_through=start)

        order = SampleOrder(len(data), cfg.seed)
        skipped = 0
        losses_now: dict[str, float] = {}
        for it in range(start, cfg.solver.max_iters):
            t0 = time.perf_counter()
            rng = seeded_generator(cfg.seed, 2, it)
            torch.manual_seed(int(seeded_generator(cfg.seed, 3, it).integers(2**62)))
            images, targets = [], []
            for j in range(cfg.solver.batch_size):
                sample, bad = fetch(data, order, it * cfg.solver.batch_size + j)
                skipped += bad
                if rng.random() < cfg.augment.hflip_prob:
                    sample = hflip(sample)
                image, target = to_target(sample, device)
                images.append(image)
                targets.append(target)
            factor = float(rng.uniform(*cfg.augment.scale_range))
            data_seconds = time.perf_counter() - t0

            lr = learning_rate(cfg.solver, it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with training_scale(model, factor), torch.autocast(device.type, enabled=use_amp):
                loss_dict = model(images, targets)
            total = sum(loss_dict.values())
            assert isinstance(total, Tensor)
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"iteration {it + 1}: loss is {total.item()} ({_fmt(loss_dict)}); lower solver.lr or "
                    "set solver.clip_grad_norm"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if cfg.solver.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, cfg.solver.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()

            seconds = time.perf_counter() - t0
            losses_now = {k: float(v.detach()) for k, v in loss_dict.items()}
            record = IterationRecord(
                iteration=it + 1,
                max_iters=cfg.solver.max_iters,
                lr=lr,
                losses=losses_now,
                total_loss=float(total.detach()),
                seconds=seconds,
                data_seconds=data_seconds,
                images_per_second=cfg.solver.batch_size / seconds,
                skipped_samples=skipped,
            )
            log.write(record)
            if progress is not None:
                progress(record)
            done = it + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.solver.max_iters:
                save_checkpoint(last, model, optimizer, scaler, done)
                log.plot()
        final = out / "model_final.pt"
        torch.save(model.state_dict(), final)
        log.plot()
        log.close()
    finally:
        torch.use_deterministic_algorithms(previous_determinism)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill  # type: ignore[attr-defined]
    return TrainResult(
        output_dir=out,
        final_checkpoint=final,
        iterations=cfg.solver.max_iters - start,
        wall_seconds=time.perf_counter() - wall_start,
        cpu_seconds=time.process_time() - cpu_start,
        last_losses=losses_now,
        skipped_samples=skipped,
    )


def fetch(data: Dataset, order: SampleOrder, k: int) -> tuple[Sample, int]:
    """The sample for global position k; an unreadable one is replaced by the next in order."""
    for attempt in range(MAX_CONSECUTIVE_BAD_SAMPLES):
        try:
            return data[order(k + attempt)], attempt
        except DatasetError as exc:
            last_error = exc
    raise DatasetError(f"{MAX_CONSECUTIVE_BAD_SAMPLES} samples in a row could not be read; last: {last_error}")


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, iteration: int
) -> None:
    tmp = path.with_suffix(".tmp")
    state: dict[str, Any] = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration}
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    torch.save(state, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a half checkpoint behind


def save_half_weights(model_or_state: nn.Module | dict[str, Tensor], path: str | Path) -> Path:
    """Weights only, floating tensors as fp16: half the size, for the bundled model
    (`model.checkpoint.load_weights` casts them back to the model's dtype)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(half, path)
    return path


def _fmt(losses: dict[str, Tensor]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())


# --------------------------------------------------------------------------- metrics log


class MetricsLog:
    """metrics.csv and metrics.jsonl, one row per iteration; on resume, rows after the
    checkpoint's iteration (written before a crash) are dropped so none appears twice."""

    columns = ("iteration", "lr", "total_loss", *LOSS_NAMES, "seconds", "data_seconds", "images_per_second")

    def __init__(self, out: Path, keep_through: int):
        self.csv_path, self.jsonl_path = out / "metrics.csv", out / "metrics.jsonl"
        self.png_path = out / "loss_curves.png"
        rows = [r for r in self._read_jsonl() if r["iteration"] <= keep_through] if keep_through else []
        self.rows: list[dict[str, Any]] = rows
        self._jsonl = open(self.jsonl_path, "w", encoding="utf-8")
        self._csv_file = open(self.csv_path, "w", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.columns, extrasaction="ignore")
        self._csv.writeheader()
        for row in rows:
            self._emit(row)

    def _read_jsonl(self) -> list[dict[str, Any]]:
        if not self.jsonl_path.is_file():
            return []
        return [json.loads(line) for line in self.jsonl_path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def _emit(self, row: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(row) + "\n")
        self._csv.writerow(row)
        self._jsonl.flush()
        self._csv_file.flush()

    def write(self, r: IterationRecord) -> None:
        row = {
            "iteration": r.iteration,
            "lr": r.lr,
            "total_loss": r.total_loss,
            **r.losses,
            "seconds": r.seconds,
            "data_seconds": r.data_seconds,
            "images_per_second": r.images_per_second,
        }
        self.rows.append(row)
        self._emit(row)

    def plot(self) -> None:
        if self.rows:
            names = ("total_loss", *(n for n in LOSS_NAMES if n in self.rows[0]))
            series = {n: [r[n] for r in self.rows] for n in names}
            write_loss_plot(self.png_path, [r["iteration"] for r in self.rows], series)

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()
