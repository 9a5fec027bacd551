"""Training loop: schedule, determinism, resume, fine-tuning init, augmentation, bad data,
the metrics log and plot, the shipped configs, and `maskstream train` end to end."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from maskstream.model.checkpoint import read_state_dict
from maskstream.model.config import ModelConfig
from maskstream.model.datasets import CocoDataset, DatasetError, DatasetSpec, Sample, SyntheticDataset
from maskstream.model.mask_rcnn import MaskRCNN
from maskstream.model.synthetic import write_synthetic_dataset
from maskstream.model.train import (
    AugmentConfig,
    DataConfig,
    ModelSource,
    SampleOrder,
    SolverConfig,
    TrainConfig,
    hflip,
    init_model,
    learning_rate,
    resolve_paths,
    save_half_weights,
    train,
)
from maskstream.pipeline.cli.main import main
from maskstream.pipeline.config import config_to_dict, dump_config, load_config

from tests.tiny_models import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]

def tiny_config(out: Path, max_iters: int = 20, **solver) -> TrainConfig:
    return TrainConfig(
        output_dir=out,
        solver=SolverConfig(max_iters=max_iters, batch_size=2, lr=0.01, warmup_iters=5, **solver),
        augment=AugmentConfig(hflip_prob=0.5, scale_range=(0.75, 1.25)),
        checkpoint_every=10,
        device="cpu",
    )


def tiny_data(count: int = 8) -> SyntheticDataset:
    return SyntheticDataset(count=count, seed=0, height=128, width=128, max_objects=3)


def losses_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- pieces


def test_learning_rate_warmup_step_and_cosine():
    step = SolverConfig(lr=0.1, warmup_iters=10, warmup_factor=0.01, schedule="step", steps=(50, 80), max_iters=100)
    assert learning_rate(step, 0) == pytest.approx(0.001)
    assert learning_rate(step, 5) == pytest.approx(0.1 * (0.01 * 0.5 + 0.5))
    assert learning_rate(step, 10) == pytest.approx(0.1)
    assert learning_rate(step, 49) == pytest.approx(0.1)
    assert learning_rate(step, 50) == pytest.approx(0.01)
    assert learning_rate(step, 99) == pytest.approx(0.001)
    cosine = dataclasses.replace(step, schedule="cosine", warmup_iters=0)
    assert learning_rate(cosine, 0) == pytest.approx(0.1)
    assert learning_rate(cosine, 50) == pytest.approx(0.05)
    assert learning_rate(cosine, 99) == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 0.99)))


def test_sample_order_is_a_seeded_permutation_per_epoch():
    order = SampleOrder(5, seed=3)
    first, second = [order(k) for k in range(5)], [order(k) for k in range(5, 10)]
    assert sorted(first) == sorted(second) == list(range(5))
    assert first != second or first != list(range(5))
    assert [SampleOrder(5, seed=3)(k) for k in range(10)] == first + second


def test_hflip_mirrors_image_masks_and_boxes():
    image = np.zeros((4, 6, 3), np.uint8)
    image[1, 0] = 255
    masks = np.zeros((1, 4, 6), np.uint8)
    masks[0, 1:3, 0:2] = 1
    sample = Sample(1, image, np.array([[0, 1, 2, 3]], np.float32), np.array([1]), masks)
    flipped = hflip(sample)
    assert flipped.image[1, 5].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(flipped.boxes, [[4, 1, 6, 3]])
    assert flipped.masks[0, 1:3, 4:6].all() and flipped.masks.sum() == 4


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="scale_range"):
        TrainConfig(augment=AugmentConfig(scale_range=(1.2, 0.8)))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(solver=SolverConfig(schedule="step", steps=(80, 50)))


# --------------------------------------------------------------------------- the loop


def test_twenty_iterations_twice_give_identical_losses(tmp_path):
    data = tiny_data()
    a = train(tiny_config(tmp_path / "a"), TINY_MODEL, dataset=data)
    b = train(tiny_config(tmp_path / "b"), TINY_MODEL, dataset=data)
    rows_a, rows_b = losses_of(tmp_path / "a"), losses_of(tmp_path / "b")
    assert len(rows_a) == 20
    keys = ("total_loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
    assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]
    assert a.last_losses == b.last_losses
    # Training does something: the late losses are below the early ones.
    assert np.mean([r["total_loss"] for r in rows_a[-5:]]) < np.mean([r["total_loss"] for r in rows_a[:5]])
    for name in ("last.pt", "model_final.pt", "metrics.csv", "loss_curves.png"):
        assert (tmp_path / "a" / name).is_file()
    plot = cv2.imread(str(tmp_path / "a" / "loss_curves.png"))
    assert plot is not None and plot.shape[2] == 3
    assert (tmp_path / "a" / "metrics.csv").read_text().splitlines()[0].startswith("iteration,lr,total_loss")


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    """Stopped at 4 of 8 then resumed = 8 straight (constant lr after warm-up, so the
    schedule does not depend on where max_iters was when the first run ended)."""
    data = tiny_data()
    flat = {"schedule": "step", "steps": ()}
    straight = dataclasses.replace(tiny_config(tmp_path / "straight", 8, **flat), checkpoint_every=4)
    train(straight, TINY_MODEL, dataset=data)
    first = dataclasses.replace(tiny_config(tmp_path / "resumed", 4, **flat), checkpoint_every=4)
    train(first, TINY_MODEL, dataset=data)
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"iteration": 5, "total_loss": 99.0}) + "\n")  # a row written before a crash
    rest = dataclasses.replace(first, solver=dataclasses.replace(first.solver, max_iters=8))
    result = train(rest, TINY_MODEL, dataset=data, resume=True)
    assert result.iterations == 4
    rows_straight, rows_resumed = losses_of(tmp_path / "straight"), losses_of(tmp_path / "resumed")
    assert [r["iteration"] for r in rows_resumed] == list(range(1, 9))
    assert [r["total_loss"] for r in rows_resumed] == [r["total_loss"] for r in rows_straight]
    a = read_state_dict(tmp_path / "straight" / "model_final.pt")
    b = read_state_dict(tmp_path / "resumed" / "model_final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(Exception, match="last.pt does not exist"):
        train(tiny_config(tmp_path, 2), TINY_MODEL, dataset=tiny_data(), resume=True)


def test_class_count_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs num_classes=5.*it has 3"):
        train(tiny_config(tmp_path, 2), dataclasses.replace(TINY_MODEL, num_classes=3), dataset=tiny_data())


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    write_synthetic_dataset(tmp_path / "data", count=4, seed=1, height=128, width=128)
    (tmp_path / "data" / "images" / "scene_000002.png").write_bytes(b"broken")
    data = CocoDataset.from_json(tmp_path / "data" / "annotations.json", tmp_path / "data" / "images")
    records = []
    result = train(tiny_config(tmp_path / "run", 6), TINY_MODEL, dataset=data, progress=records.append)
    assert len(records) == 6 and result.skipped_samples >= 1  # 12 draws over 4 images meet the broken one
    assert records[-1].skipped_samples == result.skipped_samples


def test_a_dataset_of_only_unreadable_images_stops_with_a_clear_error(tmp_path):
    write_synthetic_dataset(tmp_path / "data", count=2, seed=1, height=64, width=64)
    for png in (tmp_path / "data" / "images").iterdir():
        png.write_bytes(b"broken")
    data = CocoDataset.from_json(tmp_path / "data" / "annotations.json", tmp_path / "data" / "images")
    with pytest.raises(DatasetError, match="samples in a row could not be read"):
        train(tiny_config(tmp_path / "run", 2), TINY_MODEL, dataset=data)


def test_fine_tuning_to_other_classes_replaces_only_the_predictors(tmp_path):
    torch.manual_seed(1)
    source = MaskRCNN(TINY_MODEL)
    torch.save(source.state_dict(), tmp_path / "five.pt")
    torch.manual_seed(2)
    target = MaskRCNN(dataclasses.replace(TINY_MODEL, num_classes=3))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    init_model(target, str(tmp_path / "five.pt"))
    got, src = target.state_dict(), source.state_dict()
    for key, value in got.items():
        if key.startswith(("roi_heads.box_predictor.", "roi_heads.mask_predictor.")):
            assert torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, src[key]), key
    same = MaskRCNN(TINY_MODEL)
    init_model(same, str(tmp_path / "five.pt"))  # same classes: everything loaded
    assert torch.equal(same.roi_heads.box_predictor.cls_score.weight, source.roi_heads.box_predictor.cls_score.weight)


def test_half_precision_weights_load_back_as_float32(tmp_path):
    net = MaskRCNN(TINY_MODEL)
    path = save_half_weights(net, tmp_path / "half.pt")
    stored = torch.load(path, weights_only=True)
    assert stored["rpn.head.conv.0.0.weight"].dtype == torch.float16
    again = MaskRCNN(TINY_MODEL)
    init_model(again, str(path))
    weight = again.rpn.head.conv[0][0].weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, net.rpn.head.conv[0][0].weight, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- configs and CLI


@pytest.mark.parametrize("name", ["synthetic_lite.yaml", "coco128_person_car_lite.yaml"])
def test_shipped_train_configs_mirror_the_dataclass(name):
    import yaml

    path = ROOT / "configs" / "train" / name
    cfg = load_config(TrainConfig, path)
    written = yaml.safe_load(path.read_text())

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    # Every key of the dataclass is written out (dataset specs are compared where present).
    full = keys(config_to_dict(cfg))
    assert keys(written) == full, sorted(keys(written) ^ full)
    # No machine's paths: the model config beside the file, datasets from the command line.
    assert not cfg.model.config.is_absolute() and cfg.data.train.path is None
    model_cfg = load_config(ModelConfig, resolve_paths(cfg, path.parent).model.config, list(cfg.model.overrides))
    assert model_cfg.variant == "lite" and len(model_cfg.class_names) == model_cfg.num_classes


def test_train_command_end_to_end(tmp_path, capsys):
    model_yaml = tmp_path / "tiny.yaml"
    from maskstream.pipeline.config import dump_config

    model_yaml.write_text(dump_config(TINY_MODEL))
    out = tmp_path / "run"
    args = [
        "train", "--config", str(ROOT / "configs" / "train" / "synthetic_lite.yaml"),
        "--set", f"model.config={model_yaml}", "--set", "model.init=none",
        "--set", f"output_dir={out}", "--set", "solver.max_iters=3", "--set", "solver.warmup_iters=1",
        "--set", "data.train.synthetic={count: 4, seed: 0, height: 96, width: 96}",
        "--set", "data.val.synthetic={count: 2, seed: 1000000, height: 96, width: 96}",
        "--build-engine",
    ]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 3, captured.err  # trained, evaluated; the engine needs TensorRT, which is absent here
    assert "TensorRT is not available" in captured.err
    assert "trained 3 iterations" in captured.out and "segm" in captured.out
    # progress off a terminal: one timestamped line at the end (and one every --progress-every seconds)
    assert re.search(r"\d\d:\d\d:\d\d INFO maskstream.progress: train: 3/3 iterations \(100%\) .*loss ",
                     captured.err), captured.err
    assert re.search(r"INFO maskstream.progress: eval: 2/2 images \(100%\)", captured.err)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["val"]) == {"bbox", "segm"}
    assert (out / "model.yaml").is_file() and (out / "config.yaml").is_file()
    assert load_config(TrainConfig, out / "config.yaml").solver.max_iters == 3


def test_resolve_paths_takes_the_inputs_relative_to_the_config_file():
    base = Path("/srv/experiments/cfg")
    cfg = TrainConfig(
        model=ModelSource(config=Path("../models/m.yaml"), init="ckpt/last.pt"),
        data=DataConfig(DatasetSpec(format="coco", path=Path("data/ann.json"), images=Path("/abs/images")),
                        DatasetSpec(format="synthetic")),
        output_dir=Path("runs/x"),
    )
    got = resolve_paths(cfg, base)
    assert got.model.config == Path("/srv/experiments/models/m.yaml")
    assert got.model.init == "/srv/experiments/cfg/ckpt/last.pt"
    assert got.data.train.path == base / "data/ann.json" and got.data.train.images == Path("/abs/images")
    assert got.data.val == DatasetSpec(format="synthetic")  # nothing to resolve
    assert got.output_dir == Path("runs/x")  # a run writes where it is started
    assert resolve_paths(dataclasses.replace(cfg, model=ModelSource(init="imagenet")), base).model.init == "imagenet"
    assert resolve_paths(TrainConfig(data=DataConfig(val=None)), base).data.val is None


def test_train_config_finds_its_model_config_from_any_directory(tmp_path, monkeypatch, capsys):
    """A config's own paths are relative to it; --set paths and output_dir to the working directory."""
    (tmp_path / "exp" / "models").mkdir(parents=True)
    (tmp_path / "exp" / "models" / "tiny.yaml").write_text(dump_config(TINY_MODEL))
    (tmp_path / "exp" / "cfg").mkdir()
    config = tmp_path / "exp" / "cfg" / "train.yaml"
    config.write_text("model: {config: ../models/tiny.yaml, init: none}\n"
                      "data: {train: {format: synthetic, synthetic: {count: 2, seed: 0, height: 96, width: 96}}}\n"
                      "solver: {max_iters: 1, warmup_iters: 0}\noutput_dir: run\ndevice: cpu\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "--config", str(config)]) == 0, capsys.readouterr().err
    written = load_config(TrainConfig, tmp_path / "elsewhere" / "run" / "config.yaml")
    assert written.model.config == tmp_path / "exp" / "models" / "tiny.yaml"
    # The same name given with --set is the working directory's: there is none here.
    assert main(["train", "--config", str(config), "--set", "model.config=models/tiny.yaml"]) == 2
    assert "models/tiny.yaml: cannot read config file" in capsys.readouterr().err


def test_a_real_data_config_takes_its_dataset_from_the_command_line(tmp_path, capsys):
    config = ROOT / "configs" / "train" / "coco128_person_car_lite.yaml"
    out = ["--set", f"output_dir={tmp_path / 'run'}"]
    assert main(["train", "--config", str(config), *out]) == 2
    err = capsys.readouterr().err
    assert "data.train reads a yolo_seg dataset, and its path is not set" in err
    assert "--data PATH or --set data.train.path=PATH" in err
    # Given either way, it is the dataset read (here a folder that is not there).
    for given in (["--data", str(tmp_path / "nowhere")], ["--set", f"data.train.path={tmp_path / 'nowhere'}"]):
        assert main(["train", "--config", str(config), *out, *given]) == 2
        assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_train_command_reports_a_bad_config(tmp_path, capsys):
    config = ROOT / "configs" / "train" / "synthetic_lite.yaml"
    code = main(["train", "--config", str(config), "--set", "solver.lr=fast"])
    assert code == 2
    assert "solver.lr: expected float" in capsys.readouterr().err
