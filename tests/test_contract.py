"""The inference contract: one object, from the model config or an engine's manifest, handed to
preprocess, inference and postprocess; an engine that disagrees with what was asked is refused
at start, before any stage process exists."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from maskstream.model.contract import ContractMismatch, InferenceContract
from maskstream.model.engine import EngineMismatch, manifest_path
from maskstream.model.runners import RunnerSpec, TorchRunner, configure_process, make_runner
from maskstream.pipeline.cli.main import main
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.run_config import ModelSelection, RunConfig, inference_contract, model_config, plan
from maskstream.pipeline.stages.infer import InferConfig, InferStage

from tests.tiny_models import SHAPE, tiny_manifest, tiny_runner_config

ROOT = Path(__file__).resolve().parents[1]
LITE = ROOT / "configs" / "model_lite.yaml"
# The lite config shaped as tests/tiny_models.tiny_manifest() says its engine was built.
AS_BUILT = ("static.batch=2", "static.height=128", "static.width=160", "static.detections=10")


def _engine(tmp_path: Path, **changes) -> Path:
    """An engine file with a manifest beside it (TensorRT is not installed here, so no runner can
    load it: everything below is decided from the manifest, before any runner is made)."""
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(b"not an engine")
    tiny_manifest(**changes).write(manifest_path(engine))
    return engine


def test_from_model_config_and_from_manifest():
    cfg = tiny_runner_config()
    contract = InferenceContract.from_model_config(cfg, "fp16")
    assert contract.input_shape == (SHAPE.batch, 3, SHAPE.height, SHAPE.width) and contract.input_hw == (128, 160)
    assert contract.detections == SHAPE.detections and contract.precision == "fp16"
    assert len(contract.class_names) == 91 and contract.class_names[1] == "person"  # COCO's for 91 classes
    assert contract.image_mean == cfg.transform.image_mean and contract.pad_rgb == (124, 116, 104)
    built = InferenceContract.from_manifest(tiny_manifest())
    assert built == InferenceContract(2, 128, 160, 10, ("__background__", "person"), cfg.transform.image_mean,
                                      cfg.transform.image_std, "fp16")


def test_check_names_the_first_field_that_differs():
    contract = InferenceContract.from_model_config(tiny_runner_config())
    contract.check(contract, "x", "y")
    cases = [
        (dict(height=96), "height does not match the plan: expected 128, found 96"),
        (dict(detections=7), "detections does not match the plan: expected 10, found 7"),
        (dict(class_names=contract.class_names[:2]), "class_names does not match the plan: expected 91 entries, "
                                                     "found 2"),
        (dict(class_names=("x", *contract.class_names[1:])), "entry 0: expected '__background__', found 'x'"),
        (dict(image_std=(1.0, 1.0, 1.0)), "image_std does not match the plan: expected (0.229, 0.224, 0.225)"),
        (dict(precision="fp16"), "precision does not match the plan: expected 'fp32', found 'fp16'"),
    ]
    for changes, message in cases:
        with pytest.raises(ContractMismatch) as info:
            contract.check(dataclasses.replace(contract, **changes), "the runner", "the plan")
        assert str(info.value).startswith("the runner: ") and message in str(info.value)
    contract.check(dataclasses.replace(contract, precision="fp16"), "x", "y", ignore=("precision",))
    contract.check(dataclasses.replace(contract, height=96), "x", "y", only=("precision",))


@pytest.mark.parametrize("changes, message", [
    (dict(batch=0), "batch: expected an int >= 1, got 0"),
    (dict(height=True), "height: expected an int >= 1, got True"),
    (dict(class_names=()), "class_names: expected at least one name"),
    (dict(image_mean=(0.5, 0.5)), "image_mean: expected 3 values"),
    (dict(precision="int8"), "precision: expected one of fp32, fp16, got 'int8'"),
])
def test_contract_refuses_impossible_values(changes, message):
    good = dict(batch=1, height=8, width=8, detections=1, class_names=("bg",), image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=message):
        InferenceContract(**{**good, **changes})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the plan


def _run_config(**model) -> RunConfig:
    return RunConfig(sources=("clip.mp4",), model=ModelSelection(**model))


def _stage_configs(cfg: RunConfig) -> dict[str, object]:
    the_plan = plan(cfg)
    the_plan.close()
    return {spec.name.split(".")[0]: spec.config for spec in the_plan.specs}


def test_without_an_engine_every_stage_gets_the_model_configs_contract():
    cfg = _run_config(config=LITE, overrides=AS_BUILT)
    configs = _stage_configs(cfg)
    want = InferenceContract.from_model_config(model_config(cfg.model)[0])
    assert configs["preprocess"].contract == configs["postprocess"].contract == want  # type: ignore[attr-defined]
    infer = configs["infer"]
    assert isinstance(infer, InferConfig) and infer.contract == want and infer.runner.input_shape == want.input_shape


def test_with_an_engine_every_stage_gets_the_manifests_contract(tmp_path):
    """The preprocess size and the class names come from the manifest, whatever the default model
    config says (an engine's manifest is what it takes), and the runner is told the shape."""
    engine = _engine(tmp_path)
    configs = _stage_configs(_run_config(engine=engine))
    want = InferenceContract.from_manifest(tiny_manifest())
    assert configs["preprocess"].contract == configs["postprocess"].contract == want  # type: ignore[attr-defined]
    infer = configs["infer"]
    assert isinstance(infer, InferConfig) and infer.contract == want
    assert infer.runner.engine == engine and infer.runner.input_shape == (2, 3, 128, 160)


@pytest.mark.parametrize("selection, message", [
    (dict(config=LITE, overrides=AS_BUILT[:1]), f"height does not match the model config {LITE} with its overrides: "
                                                "expected 512, found 128"),
    (dict(config=LITE, overrides=AS_BUILT[:2]), "width does not match"),
    (dict(config=LITE, overrides=AS_BUILT[:3]), "detections does not match the model config"),
    (dict(config=LITE, overrides=AS_BUILT), "class_names does not match"),  # the lite config: COCO's 91
    (dict(precision="fp32"), "precision does not match --precision: expected 'fp32', found 'fp16'"),
])
def test_an_engine_that_disagrees_with_what_was_asked_is_refused_at_start(tmp_path, selection, message):
    engine = _engine(tmp_path)
    cfg = _run_config(engine=engine, **selection)
    with pytest.raises(ContractMismatch) as info:
        plan(dataclasses.replace(cfg, transport=dataclasses.replace(cfg.transport, endpoint_dir=tmp_path / "absent")))
    assert str(info.value).startswith(f"{engine} (manifest): ") and message in str(info.value)


def test_an_engine_that_matches_what_was_asked_is_taken(tmp_path):
    names = tuple(f"class_{i}" for i in range(91))
    engine = _engine(tmp_path, class_names=names, precision="fp32")
    selection = ModelSelection(config=LITE, engine=engine, precision="fp32", overrides=AS_BUILT)
    model_cfg = dataclasses.replace(model_config(selection)[0], class_names=names)
    assert inference_contract(selection, model_cfg) == InferenceContract.from_manifest(tiny_manifest(
        class_names=names, precision="fp32"))


def test_an_engine_without_manifest_is_refused_at_start(tmp_path):
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(EngineMismatch, match=r"no manifest tiny\.json beside the engine"):
        inference_contract(ModelSelection(engine=engine), tiny_runner_config())


def test_the_cli_refuses_a_mismatched_engine_before_starting_anything(tmp_path, capsys):
    engine = _engine(tmp_path)
    clip = write_test_clip(tmp_path / "clip.mp4", frames=3)  # sources are probed first: a real one
    code = main(["run", "--quiet", "--log-level", "error", "--source", str(clip), "--engine", str(engine),
                 "--model-config", str(LITE), "--out-dir", str(tmp_path / "out"),
                 "--set", f"transport.endpoint_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {engine} (manifest): batch does not match the model config")
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"maskstream-{os.getpid()}-")]  # no ring made


# ----------------------------------------------------------------------------- the runner


def test_the_inference_stage_refuses_a_runner_that_breaks_the_contract():
    config = tiny_runner_config()
    planned = dataclasses.replace(InferenceContract.from_model_config(config), detections=7)
    with pytest.raises(ContractMismatch, match="infer: the runner: detections does not match the run's inference "
                                               "contract: expected 7, found 10"):
        InferStage(InferConfig(RunnerSpec(config=config, device="cpu"), planned))


def test_a_runner_states_its_contract():
    runner = make_runner(RunnerSpec(config=tiny_runner_config(), device="cpu", precision="fp16"))
    assert runner.contract == InferenceContract.from_model_config(tiny_runner_config(), "fp16")
    assert runner.compile_error is None and runner.graph_error is None


def test_make_runner_seeds_the_weights_without_touching_the_process_random_state():
    spec = RunnerSpec(config=tiny_runner_config(), device="cpu", seed=3)

    def weights(runner: TorchRunner) -> torch.Tensor:
        return next(p for name, p in runner.static.named_parameters() if "mask_predictor" in name)

    torch.manual_seed(11)
    expected_draw = torch.rand(4)
    torch.manual_seed(11)
    first = make_runner(spec)
    assert torch.equal(torch.rand(4), expected_draw)  # the process's generator went on as if nothing was built
    assert isinstance(first, TorchRunner)
    again, other = make_runner(spec), make_runner(dataclasses.replace(spec, seed=4))
    assert isinstance(again, TorchRunner) and isinstance(other, TorchRunner)
    assert torch.equal(weights(first), weights(again)) and not torch.equal(weights(first), weights(other))


def test_a_runner_sets_no_process_flags_and_configure_process_does():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_process(tf32=True)
        TorchRunner(make_runner(RunnerSpec(config=tiny_runner_config(), device="cpu")).static, device="cpu", tf32=False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        configure_process(tf32=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------- torch-free stages


TORCH_FREE = ["decode", "preprocess", "publish", "postprocess"]


@pytest.mark.parametrize("stage", TORCH_FREE)
def test_stage_processes_that_need_no_torch_never_load_it(stage, tmp_path):
    """What a stage process does before its loop: import its module (to unpickle main and its
    config, an InferenceContract inside) and set itself up (_setup_process). torch stays out."""
    code = f"""
import pickle, sys
from maskstream.model.contract import InferenceContract
from maskstream.pipeline.runtime.stage import Wiring, _setup_process
import maskstream.pipeline.stages.{stage} as module
contract = InferenceContract(1, 8, 8, 1, ("bg",), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
pickle.loads(pickle.dumps((module.main, contract)))
_setup_process(Wiring(stage="{stage}.0", reports="ipc://{tmp_path}/reports"))
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("maskstream"))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
