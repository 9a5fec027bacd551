"""`maskstream segment` the way a user runs it: real files in, JSONL + PNGs out, bad files reported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from maskstream.model.rle import decode_box_cropped_rle
from maskstream.model.synthetic import make_scene
from maskstream.pipeline.cli.main import main
from maskstream.pipeline.media.images import read_rgb, write_rgb

REPO = Path(__file__).resolve().parents[1]


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


# Each CLI handler imports its heavy dependencies itself (cli/main.py says why): a torch import put
# back at the top of any CLI module, or of a module they import to build the parser, fails these.
STARTUP_PROBE = """
import argparse, socket, sys
from maskstream.pipeline.cli.main import build_parser, main

commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
for argv in (["--help"], *([command, "--help"] for command in commands)):
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code == 0, argv
with socket.socket() as s:  # a port nobody publishes on: subscribe starts, waits, times out
    s.bind(("127.0.0.1", 0))
    endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
assert main(["subscribe", endpoint, "--timeout", "0.2", "--out", sys.argv[1]]) == 1
print(len(commands), sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_help_and_subscribe_start_without_torch(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", STARTUP_PROBE, str(tmp_path / "sub.jsonl")], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    commands, imported = out.stdout.splitlines()[-1].split(" ", 1)  # after the help texts
    assert int(commands) >= 9 and imported == "[]", out.stdout[-2000:]


def test_module_entry_point_help_imports_no_torch():
    """`python -m maskstream.pipeline.cli`, as a user and each spawned stage start it, seen by -X importtime."""
    for args in (["--help"], ["subscribe", "--help"]):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "maskstream.pipeline.cli", *args], cwd=REPO,
            capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0 and "usage: maskstream" in out.stdout, out.stderr[-2000:]
        lines = [line for line in out.stderr.splitlines() if line.startswith("import time:")]
        imported = {line.rsplit("|", 1)[-1].strip() for line in lines}
        assert "maskstream.pipeline.cli.main" in imported  # the measurement saw the CLI being imported
        assert "torch" not in imported, args
