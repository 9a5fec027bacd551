from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from maskstream.configs import CONFIG_DIR, find_config, shipped_configs
from maskstream.pipeline.config import (
    ConfigError,
    config_to_dict,
    dump_config,
    load_config,
    loads_config,
    parse_override,
)


@dataclass(frozen=True)
class Heads:
    score_thresh: float = 0.05
    detections: int = 100
    mode: Literal["fast", "exact"] = "fast"


@dataclass(frozen=True)
class Model:
    num_classes: int  # required
    sizes: tuple[int, ...] = (32, 64)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    heads: Heads = field(default_factory=Heads)
    # typing.Optional resolves to typing.Union, unlike `X | None` (types.UnionType)
    weights: typing.Optional[str] = None  # noqa: UP045
    extra: Heads | None = None


@dataclass(frozen=True)
class Root:
    model: Model
    name: str = "demo"
    out: Path = Path("out")
    debug: bool = False
    tags: list[str] = field(default_factory=list)
    limit: int | str = 3


@dataclass(frozen=True)
class Checked:
    batch: int = 1

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def error_of(cls, text: str, overrides=(), source="cfg.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        loads_config(cls, text, overrides, source=source)
    return str(info.value)


# ------------------------------------------------------------------------ happy paths


def test_file_with_defaults_and_nested(tmp_path):
    path = write(
        tmp_path,
        "model:\n  num_classes: 3\n  sizes: [8, 16, 32]\n  heads: {score_thresh: 1}\n"
        "name: x\ntags: [a, b]\n",
    )
    cfg = load_config(Root, path)
    assert cfg.model.num_classes == 3
    assert cfg.model.sizes == (8, 16, 32)  # YAML list -> tuple
    assert cfg.model.heads == Heads(score_thresh=1.0)  # int accepted for float, rest default
    assert isinstance(cfg.model.heads.score_thresh, float)
    assert cfg.model.mean == (0.485, 0.456, 0.406)
    assert cfg.tags == ["a", "b"]
    assert cfg.out == Path("out")
    assert dataclasses.is_dataclass(cfg) and cfg.name == "x"


def test_defaults_only_and_required_missing():
    assert load_config(Heads) == Heads()
    message = error_of(Root, "")
    assert message == "cfg.yaml: model: missing required key (expected a mapping (Model))"
    message = error_of(Root, "model: {}")
    assert message == "cfg.yaml: model.num_classes: missing required key (expected int)"


def test_round_trip(tmp_path):
    cfg = Root(
        model=Model(
            num_classes=91,
            sizes=(1, 2),
            heads=Heads(score_thresh=1e-12, mode="exact"),
            weights="1e-3",  # a str that YAML 1.2 would read as a float
            extra=Heads(detections=7),
        ),
        name="yes",  # YAML 1.1 would read this as a bool unless quoted
        out=Path("a/b"),
        debug=True,
        tags=["x", "null"],
        limit="many",
    )
    text = dump_config(cfg)
    assert loads_config(Root, text) == cfg
    assert load_config(Root, write(tmp_path, text)) == cfg
    # key order follows field order
    assert list(config_to_dict(cfg)) == ["model", "name", "out", "debug", "tags", "limit"]
    assert text.index("num_classes") < text.index("sizes") < text.index("heads")


def test_exponent_float_without_dot():
    assert loads_config(Heads, "score_thresh: 1e-3").score_thresh == pytest.approx(0.001)


def test_optional_and_union():
    cfg = loads_config(Root, "model: {num_classes: 1, weights: null, extra: {detections: 5}}")
    assert cfg.model.weights is None and cfg.model.extra == Heads(detections=5)
    assert loads_config(Root, "model: {num_classes: 1}\nlimit: all").limit == "all"
    assert loads_config(Root, "model: {num_classes: 1}\nlimit: 4").limit == 4


def test_overrides_applied_after_file(tmp_path):
    path = write(tmp_path, "model:\n  num_classes: 3\n  heads: {detections: 10}\nname: file\n")
    cfg = load_config(
        Root,
        path,
        overrides=[
            "model.num_classes=2",
            "model.sizes=[1,2]",
            "model.heads.mode=exact",
            "name=cli",
            "model.extra.detections=4",  # a section that was null in the file
            "debug=true",
        ],
    )
    assert cfg.model.num_classes == 2
    assert cfg.model.sizes == (1, 2)
    assert cfg.model.heads == Heads(detections=10, mode="exact")
    assert cfg.model.extra == Heads(detections=4)
    assert cfg.name == "cli" and cfg.debug is True


def test_override_supplies_required_key():
    assert load_config(Root, None, ["model.num_classes=5"]).model.num_classes == 5


def test_later_override_wins():
    cfg = load_config(Root, None, ["model.num_classes=5", "model.num_classes=6"])
    assert cfg.model.num_classes == 6


def test_parse_override_values():
    assert parse_override("a.b=[1, 2]") == (("a", "b"), [1, 2])
    assert parse_override("a=x=y") == (("a",), "x=y")
    assert parse_override("a=") == (("a",), None)


# ------------------------------------------------------------------------ error paths


def test_unknown_key_top_level():
    message = error_of(Root, "model: {num_classes: 1}\nnmae: x")
    assert message.startswith("cfg.yaml: nmae: unknown key (valid keys: model, name, out,")
    assert "did you mean 'name'?" in message


def test_unknown_key_nested():
    message = error_of(Root, "model: {num_classes: 1, heads: {scroe_thresh: 0.3}}")
    assert message == (
        "cfg.yaml: model.heads.scroe_thresh: unknown key "
        "(valid keys: score_thresh, detections, mode); did you mean 'score_thresh'?"
    )


def test_wrong_type_names_file_path_expected_and_given():
    message = error_of(
        Root, "model: {num_classes: 1, heads: {score_thresh: high}}", source="configs/model.yaml"
    )
    assert message == "configs/model.yaml: model.heads.score_thresh: expected float, got str 'high'"


def test_bool_is_not_an_int():
    message = error_of(Root, "model: {num_classes: true}")
    assert message == "cfg.yaml: model.num_classes: expected int, got bool True"
    assert "expected float, got bool" in error_of(Heads, "score_thresh: false")


def test_float_is_not_an_int():
    assert "expected int, got float 2.0" in error_of(Heads, "detections: 2.0")


def test_str_is_not_a_bool_or_str_from_number():
    assert "debug: expected bool, got str 'maybe'" in error_of(
        Root, "model: {num_classes: 1}\ndebug: maybe"
    )
    assert "name: expected str, got int 5" in error_of(Root, "model: {num_classes: 1}\nname: 5")


def test_literal():
    message = error_of(Heads, "mode: slow")
    assert message == "cfg.yaml: mode: expected one of 'fast', 'exact', got str 'slow'"


def test_tuple_items_and_length():
    message = error_of(Root, "model: {num_classes: 1, sizes: [1, two]}")
    assert message == "cfg.yaml: model.sizes[1]: expected int, got str 'two'"
    message = error_of(Root, "model: {num_classes: 1, mean: [1, 2]}")
    assert "model.mean: expected a list [float, float, float] (3 items), got list of 2" in message
    message = error_of(Root, "model: {num_classes: 1, sizes: 3}")
    assert message == "cfg.yaml: model.sizes: expected a list of int, got int 3"


def test_null_for_non_optional():
    assert error_of(Heads, "detections: null") == "cfg.yaml: detections: expected int, got null"


def test_section_must_be_mapping():
    message = error_of(Root, "model: 3")
    assert message == "cfg.yaml: model: expected a mapping for Model, got int 3"


def test_top_level_must_be_mapping_and_valid_yaml():
    assert "expected a mapping at the top level, got list" in error_of(Heads, "[1, 2]")
    assert "cfg.yaml: not valid YAML" in error_of(Heads, "a: [1,")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config file"):
        load_config(Heads, tmp_path / "nope.yaml")


def test_a_config_is_a_file_or_a_shipped_config_named_as_the_docs_name_it(tmp_path, monkeypatch):
    shipped = CONFIG_DIR / "train" / "synthetic_lite.yaml"
    monkeypatch.chdir(tmp_path)  # a folder without configs/: as a user of the installed package
    for name in ("configs/train/synthetic_lite.yaml", "train/synthetic_lite.yaml", "synthetic_lite",
                 "synthetic_lite.yaml"):
        assert find_config(name) == shipped, name
    assert find_config("configs/model_v1.yaml") == find_config("model_v1") == CONFIG_DIR / "model_v1.yaml"
    (tmp_path / "configs" / "train").mkdir(parents=True)
    (tmp_path / "configs" / "train" / "synthetic_lite.yaml").write_text("{}")
    assert find_config("configs/train/synthetic_lite.yaml") == Path("configs/train/synthetic_lite.yaml")  # yours first
    for missing in ("nope.yaml", "configs/../configs/pipeline.yaml", str(tmp_path / "pipeline.yaml")):
        with pytest.raises(FileNotFoundError, match="no such file, nor a shipped config") as err:
            find_config(missing)
        assert "train/synthetic_lite.yaml" in str(err.value) and str(CONFIG_DIR) in str(err.value)
    assert sorted(shipped_configs()) == shipped_configs() and "pipeline.yaml" in shipped_configs()


def test_a_config_option_that_names_nothing_is_refused_with_the_shipped_ones(capsys):
    from maskstream.pipeline.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["train", "--config", "configs/train/nope.yaml"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--config: configs/train/nope.yaml: no such file" in err and "synthetic_lite.yaml" in err


def test_post_init_error_is_wrapped():
    message = error_of(Checked, "batch: 0")
    assert message == "cfg.yaml: batch must be >= 1, got 0"


@pytest.mark.parametrize("bad", ["model.num_classes", "=3", "model..x=1", "1x=2", " =1"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(Root, None, ["model.num_classes=1", bad])


def test_override_of_unknown_key():
    with pytest.raises(ConfigError) as info:
        load_config(Root, None, ["model.num_classes=1", "model.heads.nms=0.5"])
    assert str(info.value) == (
        "--set model.heads.nms=0.5: unknown key 'model.heads.nms' "
        "(valid keys: score_thresh, detections, mode)"
    )
    with pytest.raises(ConfigError, match="unknown key 'modle'.*did you mean 'model'"):
        load_config(Root, None, ["modle.num_classes=1"])


def test_override_into_a_scalar():
    with pytest.raises(ConfigError, match="model.num_classes is a int value, not a section"):
        load_config(Root, None, ["model.num_classes.x=1"])


def test_override_wrong_type_blames_the_override(tmp_path):
    path = write(tmp_path, "model: {num_classes: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Root, path, ["model.heads.score_thresh=high"])
    assert str(info.value) == (
        "--set model.heads.score_thresh=high: model.heads.score_thresh: "
        "expected float, got str 'high'"
    )
    # while a bad value in the file still blames the file
    path = write(tmp_path, "model: {num_classes: x}\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: model.num_classes: expected int"):
        load_config(Root, path, ["name=y"])


def test_override_mapping_with_unknown_key_blames_override():
    message = error_of(Root, "", ["model={num_classes: 1, bogus: 2}"])
    assert message.startswith("--set model={num_classes: 1, bogus: 2}: model.bogus: unknown key")


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_not_a_dataclass():
    with pytest.raises(TypeError, match="expected a dataclass type"):
        load_config(dict, None)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="expected a dataclass instance"):
        config_to_dict(Heads)
