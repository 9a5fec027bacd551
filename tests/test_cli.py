"""`maskstream segment` the way a user runs it: real files in, JSONL + PNGs out, bad files reported."""
from __future__ import annotations

import json

import numpy as np
from maskstream.model.rle import decode_box_cropped_rle
from maskstream.model.synthetic import make_scene
from maskstream.pipeline.cli.main import main
from maskstream.pipeline.media.images import read_rgb, write_rgb


def test_segment_writes_results_and_survives_a_bad_file(tmp_path, capsys):
    inputs = tmp_path / "in"
    for seed in (1, 2):
        write_rgb(inputs / f"scene{seed}.png", make_scene(seed, height=96, width=128).image)
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    code = main(
        ["segment", str(inputs), "--out", str(out), "--set", "transform.min_size=96", "--set", "transform.max_size=128",
         "--set", "roi_heads.score_thresh=0.0", "--set", "roi_heads.detections_per_img=3"]
    )
    captured = capsys.readouterr()
    assert code == 1  # one input failed...
    assert f"image {inputs / 'broken.png'}: not a readable image" in captured.err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == [str(inputs / "scene1.png"), str(inputs / "scene2.png")]  # ...others done
    for record in records:
        assert (record["height"], record["width"]) == (96, 128)
        assert len(record["detections"]) == 3
        for det in record["detections"]:
            mask = decode_box_cropped_rle(det["mask"]["rle"], det["mask"]["crop_box"], (96, 128))
            assert mask.shape == (96, 128) and mask.dtype == np.uint8
            assert set(det) == {"box", "label", "class_name", "score", "mask"}
    annotated = read_rgb(out / "annotated" / "scene1.png")
    assert annotated.shape == (96, 128, 3)


def test_segment_rejects_a_bad_override(tmp_path, capsys):
    code = main(["segment", "--out", str(tmp_path), "--set", "roi_heads.score_threshold=0.5"])
    assert code == 2
    assert "roi_heads.score_threshold" in capsys.readouterr().err


def test_run_and_bench_take_the_same_model_options():
    from maskstream.pipeline.cli.bench import bench_config
    from maskstream.pipeline.cli.main import build_parser
    from maskstream.pipeline.cli.run import run_config

    parser = build_parser()
    for command, to_config in (("run", run_config), ("bench", bench_config)):
        cfg = to_config(parser.parse_args([command, "--precision", "fp16", "--device", "cpu"]))
        assert (cfg.model.precision, cfg.model.device) == ("fp16", "cpu"), command
        assert to_config(parser.parse_args([command])).model.precision is None  # fp32, or the engine's own
