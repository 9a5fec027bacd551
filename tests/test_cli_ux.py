"""The command line as a new user meets it: named models fetched through a mirror, bad input
refused fast and once, runs that never overwrite, stream ids a person can predict, progress,
help that teaches, and results read back from files.

The runs use the tiny untrained lite model of tests/pipeline_runs.py (128x160 input, 5 detections)
or, for downloads, the bundled checkpoint served under a hashed name by the `mirror` fixture
(tests/model_mirror.py). How long each refusal took is
printed (run pytest with -s to see it), not asserted: the host is shared and loaded."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from maskstream.model.bundled import BUNDLED_CHECKPOINT, BUNDLED_CONFIG
from maskstream.model.checkpoint import CheckpointError
from maskstream.model.zoo import named_model
from maskstream.pipeline.cli.files import OutputExists, new_run_dir, refuse_existing
from maskstream.pipeline.cli.main import build_parser, main
from maskstream.pipeline.cli.progress import Progress
from maskstream.pipeline.client import Subscriber, from_json, masks, read_jsonl
from maskstream.pipeline.media.outputs import JsonlWriter
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.results import to_json
from maskstream.pipeline.run_config import ModelSelection, check_model, choose_model, split_source, stream_sources
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, Header

from tests.make_detections import make_detections
from tests.pipeline_runs import TINY_MODEL_SETS
from tests.shared_data import SHARED

ROOT = Path(__file__).resolve().parents[1]
TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
TINY_SIZES = [s for s in TINY_MODEL_SETS if not s.startswith("model.config=")]  # without the untrained config


def maskstream(args, cwd, env=None, timeout=240):
    """(exit status, stdout, stderr, seconds) of `maskstream ARGS` in a fresh interpreter in cwd."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "maskstream.pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - start


def sets(items):
    return [x for item in items for x in ("--set", item)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def street_clip(tmp_path_factory):
    return write_test_clip(tmp_path_factory.mktemp("clip") / "street.mp4", frames=12, size=(160, 120))


# ----------------------------------------------------------------------------- named models


def test_run_fetches_a_named_model_through_the_mirror_and_then_needs_no_server(mirror, tmp_path, street_clip):
    import os

    served, server = mirror
    data = BUNDLED_CHECKPOINT.read_bytes()
    name = f"shapes-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # torchvision's naming: the hash checks it
    (served / name).write_bytes(data)
    url = f"https://download.example.invalid/models/{name}"  # the mirror (MASKSTREAM_MODEL_MIRROR) serves it
    cache = tmp_path / "cache"
    env = dict(os.environ)  # the fixture set MASKSTREAM_MODEL_MIRROR and MASKSTREAM_CACHE_DIR
    args = ["run", "--source", str(street_clip), "--model", url, "--set", "source.max_frames=2", "--quiet",
            *sets(TINY_SIZES), "--set", f"transport.endpoint_dir={tmp_path}"]

    code, stdout, stderr, seconds = maskstream([*args, "--out", str(tmp_path / "first.jsonl")], tmp_path, env)
    assert code == 0, stderr
    assert (cache / name).read_bytes() == data  # downloaded whole, hash checked, renamed into the cache
    assert f"downloading {name}" in stderr
    assert f"model {url}: {cache / name} (config read from the checkpoint's keys: lite, 5 classes)" in stderr
    assert "2 frames" in stdout
    print(f"\nfirst run, downloading: {seconds:.1f} s")

    server.shutdown()  # a cache hit asks nobody
    code, stdout, stderr, seconds = maskstream([*args, "--out", str(tmp_path / "second.jsonl")], tmp_path, env)
    assert code == 0, stderr
    assert "downloading" not in stderr and "2 frames" in stdout
    print(f"second run, from the cache: {seconds:.1f} s")


def test_a_corrupt_download_is_refused_once_with_exit_2(mirror, tmp_path, street_clip):
    import os

    served, _ = mirror
    model = named_model("maskrcnn_resnet50_fpn_coco")
    (served / model.file_name).write_bytes(b"not the checkpoint torchvision published" * 1000)
    code, stdout, stderr, seconds = maskstream(
        ["run", "--source", str(street_clip), "--model", "maskrcnn_resnet50_fpn_coco",
         "--out", str(tmp_path / "r.jsonl")],
        tmp_path, dict(os.environ))
    assert code == 2
    [line] = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "refused, nothing kept" in line and "bf2d0c1e" in line and str(tmp_path / "cache" / model.file_name) in line
    assert stderr.count("refused") == 1 and stderr.count("gave a file whose SHA-256") == 1 and not stdout  # once
    assert not list((tmp_path / "cache").iterdir()) and not (tmp_path / "r.jsonl").exists()
    print(f"\ncorrupt download refused in {seconds:.1f} s")


def test_a_checkpoint_alone_brings_its_config(tmp_path):
    """model.yaml beside it (as `maskstream train` writes it), else its keys say what it is."""
    alone = tmp_path / "alone" / "shapes.pt"
    alone.parent.mkdir()
    shutil.copy(BUNDLED_CHECKPOINT, alone)
    chosen = choose_model(ModelSelection(checkpoint=alone))
    assert (chosen.config.variant, chosen.config.num_classes) == ("lite", 5)
    assert chosen.config_from == "read from the checkpoint's keys: lite, 5 classes"
    check_model(chosen)  # fits
    shutil.copy(BUNDLED_CONFIG, alone.parent / "model.yaml")
    chosen = choose_model(ModelSelection(checkpoint=alone, overrides=("roi_heads.score_thresh=0.3",)))
    assert chosen.config_from == str(alone.parent / "model.yaml") and chosen.config.roi_heads.score_thresh == 0.3
    # A config that does not fit the weights: one message, every mismatch counted, before any process.
    with pytest.raises(CheckpointError) as err:
        check_model(choose_model(ModelSelection(checkpoint=alone, overrides=("num_classes=7",))))
    assert str(err.value).count("\n") == 0 and "does not fit the model" in str(err.value)
    assert "keys with the wrong shape" in str(err.value) and "[5," in str(err.value)
    with pytest.raises(ValueError, match="both choose the weights"):
        choose_model(ModelSelection(name="maskrcnn_resnet50_fpn_coco", checkpoint=alone))


@pytest.mark.parametrize("name,variant", [("torchvision_maskrcnn_resnet50_fpn", "v1"),
                                          ("torchvision_maskrcnn_resnet50_fpn_v2", "v2")])
def test_a_torchvision_checkpoint_alone_is_read_and_checked(name, variant, tmp_path):
    """torchvision's own key names and shapes (the reference manifests), saved as a file: --checkpoint alone."""
    manifest = SHARED / "reference" / f"{name}.json"
    if not manifest.is_file():
        pytest.skip(f"{manifest} missing (../shared not laid out)")
    state = {p["name"]: torch.zeros(p["shape"]) for p in json.loads(manifest.read_text())["params"]}
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    chosen = choose_model(ModelSelection(checkpoint=path))
    assert (chosen.config.variant, chosen.config.num_classes) == (variant, 91)
    assert chosen.config_from == f"read from the checkpoint's keys: {variant}, 91 classes"
    check_model(chosen)  # every key and shape fits the model built from that config


# ----------------------------------------------------------------------------- fail fast, once


def _classifier(path: Path) -> Path:
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048),
                "fc.bias": torch.zeros(1000)}, path)
    return path


BAD_INPUTS = {
    # case: (extra args, made in tmp_path by, expected message)
    "missing file": (lambda d, c: ["--source", str(d / "missing.mp4")],
                     "error: --source {d}/missing.mp4: no such file"),
    "directory": (lambda d, c: ["--source", str(d)], "error: --source {d}: is a directory, expected a video file"),
    "text file": (lambda d, c: ["--source", str(_text(d / "notes.txt"))],
                  "error: --source {d}/notes.txt: not a video (FFmpeg reads it as Tele-typewriter)"),
    "text named .mp4": (lambda d, c: ["--source", str(_text(d / "notes.mp4"))],
                             "error: --source {d}/notes.mp4: cannot open as a video (Invalid data found"),
    "unknown model name": (lambda d, c: ["--source", str(c), "--model", "maskrcnn_r50"],
                           "error: --model 'maskrcnn_r50': unknown model; known: bundled_lite_shapes, "
                           "maskrcnn_resnet50_fpn_coco, maskrcnn_resnet50_fpn_v2_coco, or a checkpoint URL"),
    "checkpoint of another architecture": (
        lambda d, c: ["--source", str(c), "--checkpoint", str(_classifier(d / "resnet50.pth"))],
        "error: checkpoint {d}/resnet50.pth: 3 tensors, an image classifier"),
    "no GPU for --device cuda": (lambda d, c: ["--source", str(c), "--device", "cuda"],
                                 "error: --device cuda: no CUDA device here (torch "),
    # without --source the run would write its sample clip into a new run directory first
    "no GPU, the built-in sample": (lambda d, c: ["--device", "cuda"], "error: --device cuda: no CUDA device here"),
    "unknown model, the built-in sample": (lambda d, c: ["--model", "coco"], "error: --model 'coco': unknown model"),
}


def _text(path: Path) -> Path:
    path.write_text("a shopping list, not a video\n" * 40)  # long enough for FFmpeg to call it text
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_the_model_loads_in_one_message(case, tmp_path, street_clip):
    if case.startswith("no GPU") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    make_args, expected = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    code, stdout, stderr, seconds = maskstream(["run", *make_args(work, street_clip)], work)
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected.format(d=work)), stderr
    assert errors[0].count("error") == 1 or "error" not in errors[0][7:]  # said once, not repeated inside
    assert not stdout and not (work / "runs").exists()  # no run directory, no output
    assert "model:" not in stderr and "using the bundled model" not in stderr  # refused before any model loaded
    print(f"\n{case}: refused in {seconds:.2f} s (a fresh interpreter included): {errors[0][:110]}")


def test_an_unreachable_camera_is_said_once_then_retried(tmp_path):
    camera = f"rtsp://127.0.0.1:{free_port()}/camera"  # nothing listens there
    start = time.monotonic()
    run = subprocess.Popen(
        [sys.executable, "-m", "maskstream.pipeline.cli", "run", "--quiet", "--source", f"cam0={camera}",
         "--out", str(tmp_path / "r.jsonl"), *sets(TINY_MODEL_SETS), "--set", "source.max_reconnects=1",
         "--set", "source.reconnect_backoff_s=[0.1, 0.2]", "--set", f"transport.endpoint_dir={tmp_path}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    warned_after = None
    err_lines = []
    for line in run.stderr:
        err_lines.append(line)
        if warned_after is None and "not reachable now" in line:
            warned_after = time.monotonic() - start
    stdout = run.stdout.read()
    run.wait(timeout=150)
    stderr = "".join(err_lines)
    assert run.returncode == 1, stderr  # the stream failed during the run; the run itself started
    [warning] = [line for line in err_lines if "not reachable now" in line]
    assert re.match(TIMESTAMP + " WARNING maskstream.run: cam0 \\(" + re.escape(camera) + "\\): not reachable now "
                    "\\(Connection refused\\); the run starts anyway and will retry it, up to 1 times", warning)
    [summary] = [line for line in stdout.splitlines() if line.strip().startswith("cam0 (")]
    assert "FAILED" in summary and "gave up after 2 connection attempts" in summary
    print(f"\nunreachable camera: said after {warned_after:.2f} s, run ended (exit 1) after "
          f"{time.monotonic() - start:.1f} s")


# ----------------------------------------------------------------------------- never clobber


def test_runs_go_to_new_directories_refuse_old_outputs_and_annotate_only_max_frames(tmp_path, street_clip, monkeypatch):
    endpoint_dir = ["--set", f"transport.endpoint_dir={tmp_path}"]
    args = ["run", "--source", str(street_clip), "--set", "source.max_frames=5", "--progress-every", "0.2",
            *sets(TINY_MODEL_SETS), *endpoint_dir]
    code, stdout, stderr, _ = maskstream(args, tmp_path)
    assert code == 0, stderr
    run1 = tmp_path / "runs" / "run-1"
    assert re.search(TIMESTAMP + r" INFO maskstream.run: run directory: runs/run-1\n", stderr)
    assert re.search(TIMESTAMP + r" INFO maskstream.run: stream street <- " + re.escape(str(street_clip))
                     + r" \(offline, 5 frames, 160x120\)", stderr)  # max_frames, not the file's 12
    # Not a terminal: timestamped progress lines, counted against max_frames.
    assert re.search(TIMESTAMP + r" INFO maskstream.progress: street: 5/5 frames \(100%\)", stderr), stderr
    assert {p.name for p in run1.iterdir()} == {"results.jsonl", "coco_results.json", "annotated.mp4"}
    with av.open(str(run1 / "annotated.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == 5  # the frames the run processed, not the source's 12
    assert [line["seq"] for line in map(json.loads, (run1 / "results.jsonl").read_text().splitlines())] == \
        [0, 1, 2, 3, 4, 5]

    # The README's read_jsonl example, as written, on this run's results (stream "street" in runs/run-1).
    readme = (ROOT / "README.md").read_text()
    [example] = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "read_jsonl(" in block]
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(example, "README.md", "exec"), {})
    assert re.findall(r"^(\d+) \(", printed.getvalue(), re.M) == ["0", "1", "2", "3", "4"]  # seq, class names...

    before = (run1 / "results.jsonl").read_bytes()
    code, stdout, stderr, seconds = maskstream([*args, "--out-dir", str(run1)], tmp_path)
    assert code == 2
    [error] = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: {run1}/results.jsonl, {run1}/coco_results.json, {run1}/annotated.mp4: already "
                            "there") and error.endswith("add --overwrite")
    assert (run1 / "results.jsonl").read_bytes() == before and "model:" not in stderr  # refused before the model
    print(f"\nexisting outputs refused in {seconds:.2f} s")

    out = tmp_path / "r.jsonl"
    out.write_text("an earlier run's results\n")
    code, stdout, stderr, _ = maskstream([*args, "--out", str(out), "--overwrite", "--quiet"], tmp_path)
    assert code == 0, stderr
    assert f"--overwrite: removed {out}" in stderr and "earlier run" not in out.read_text()
    assert len(out.read_text().splitlines()) == 6
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-1"]  # named outputs: no run directory

    code, stdout, stderr, _ = maskstream([*args, "--quiet"], tmp_path)
    assert code == 0, stderr
    assert "run directory: runs/run-2" in stderr and (tmp_path / "runs" / "run-2" / "results.jsonl").is_file()


def test_run_directories_count_up_and_refusal_removes_only_with_overwrite(tmp_path):
    assert new_run_dir(tmp_path, "run") == tmp_path / "run-1"
    (tmp_path / "run-7").mkdir()
    (tmp_path / "run-x").mkdir()
    assert new_run_dir(tmp_path, "run") == tmp_path / "run-8"  # after the highest: runs sort as they started
    old = tmp_path / "old.jsonl"
    old.write_text("kept\n")
    with pytest.raises(OutputExists, match="old.jsonl: already there"):
        refuse_existing([old, tmp_path / "new.jsonl"], overwrite=False)
    assert old.read_text() == "kept\n"
    assert refuse_existing([old, tmp_path / "new.jsonl"], overwrite=True) == [old] and not old.exists()


# ----------------------------------------------------------------------------- stream ids


def test_stream_ids_follow_the_documented_rule():
    sources = (
        "videos/street.mp4",                                   # a file: its stem
        "cam0=rtsp://cam0/stream",                             # named
        "rtsp://admin:secret@10.0.0.5:554/Streaming/Channels/101",  # host and path, no user or port
        "http://example.com/live/index.m3u8?token=a=b",        # query and last suffix dropped
        "/dev/video0",
        "other/street.mp4",                                    # taken: -2
        "street-2=rtsp://x/y",                                 # a name wins over a generated id
        "my clip (1).mp4",
    )
    ids = [sid for sid, _ in stream_sources(sources)]
    assert ids == ["street", "cam0", "10.0.0.5-Streaming-Channels-101", "example.com-live-index", "video0",
                   "street-3", "street-2", "my-clip-1"]
    assert stream_sources(sources) == stream_sources(sources)  # stable: the same sources give the same ids
    assert stream_sources(sources)[1] == ("cam0", "rtsp://cam0/stream")
    assert split_source("rtsp://h/p?a=b") == (None, "rtsp://h/p?a=b")
    with pytest.raises(ValueError, match="stream name.*cam0.*more than one source"):
        stream_sources(("cam0=a.mp4", "cam0=b.mp4"))


def test_the_readme_stream_examples_work_as_written(tmp_path, street_clip):
    """`--source cam0=...`, `maskstream subscribe ... --stream cam0` and `Subscriber(streams=["cam0"])`."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    subscriber_cli = subprocess.Popen(
        [sys.executable, "-m", "maskstream.pipeline.cli", "subscribe", endpoint, "--stream", "cam0",
         "--timeout", "120"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Subscriber(endpoint, streams=["cam0"], timeout_s=120) as sub:
        run = subprocess.Popen(
            [sys.executable, "-m", "maskstream.pipeline.cli", "run", "--quiet", "--source", f"cam0={street_clip}",
             "--source", f"cam1={street_clip}", "--publish", endpoint, *sets(TINY_MODEL_SETS),
             "--set", f"transport.endpoint_dir={tmp_path}"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            received = list(sub)  # ends after cam0's EndOfStream
        finally:
            stdout, stderr = run.communicate(timeout=150)
    assert run.returncode == 0, stderr
    assert "stream cam0 <- " in stderr and "stream cam1 <- " in stderr  # every id said at start
    assert {m.header.stream_id for m in received} == {"cam0"}
    assert [m.header.seq for m in received if isinstance(m, Detections)] == list(range(12))
    assert isinstance(received[-1], EndOfStream)
    out, err = subscriber_cli.communicate(timeout=60)
    assert subscriber_cli.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["seq"] for line in lines] == list(range(13)) and {line["stream_id"] for line in lines} == {"cam0"}


# ----------------------------------------------------------------------------- progress


def test_progress_off_a_terminal_is_timestamped_lines(capsys):
    main(["doctor", "--log-level", "info"])  # the CLI's logging set-up, as every command makes it
    capsys.readouterr()
    with Progress(tty=False, every_s=0.0) as progress:
        progress.set("street", 3, 795)
        progress.set("cam0", 40, None, postfix="dropped 2, latency 0.21 s")
    lines = capsys.readouterr().err.splitlines()
    assert any(re.fullmatch(TIMESTAMP + r" INFO maskstream.progress: street: 3/795 frames \(0%\) \[00:00<.*\]", line)
               for line in lines), lines
    assert any(re.fullmatch(TIMESTAMP + r" INFO maskstream.progress: cam0: 40 frames \[00:00, .*frame/s, dropped 2, "
                            r"latency 0.21 s\]", line) for line in lines), lines
    logging.getLogger().handlers.clear()


def test_progress_final_lines_only_for_counters_that_moved(capsys):
    """A run that ends right after a periodic line does not log its 100% twice; one whose counter
    moved since gets its final line."""
    main(["doctor", "--log-level", "info"])
    capsys.readouterr()

    def progress_lines() -> list[str]:
        return [line for line in capsys.readouterr().err.splitlines() if "maskstream.progress" in line]

    progress = Progress(tty=False, every_s=0.0)
    progress.set("street", 795, 795)  # logged at once (every_s 0)
    assert any("street: 795/795" in line for line in progress_lines())
    progress.close()
    assert progress_lines() == []
    progress = Progress(tty=False, every_s=3600.0)
    progress.set("cam0", 5, None)  # not yet due
    assert progress_lines() == []
    progress.close()
    closing = progress_lines()
    assert len(closing) == 1 and "cam0: 5 frames" in closing[0], closing
    logging.getLogger().handlers.clear()


def test_live_progress_shows_rate_drops_and_latency(tmp_path):
    clip = write_test_clip(tmp_path / "cam.mp4", frames=40, size=(160, 120), fps=20)
    code, stdout, stderr, _ = maskstream(
        ["run", "--source", f"cam0={clip}", "--policy", "live", "--out", str(tmp_path / "r.jsonl"),
         "--progress-every", "0.5", *sets(TINY_MODEL_SETS), "--set", f"transport.endpoint_dir={tmp_path}"], tmp_path)
    assert code == 0, stderr
    lines = re.findall(TIMESTAMP + r" INFO maskstream.progress: cam0: (\d+) frames \[[\d:]+, .*frame/s, "
                       r"dropped (\d+)(?:, latency (\d+\.\d\d) s)?\]", stderr)
    assert lines, stderr
    published, dropped, latency = lines[-1]  # the last line: where the stream ended
    summary = re.search(r"cam0 \(.*\): (\d+) frames, (\d+) lost/dropped, ok", stdout)
    assert summary is not None and (int(published), int(dropped)) == (int(summary.group(1)), int(summary.group(2))), \
        (lines, stdout)
    assert int(published) + int(dropped) <= 40 and latency and 0 < float(latency) < 10


def test_eval_reports_progress(tmp_path, capsys):
    code = main(["eval", "--format", "synthetic", "--count", "2", "--size", "96", "--out", str(tmp_path / "e.json"),
                 "--progress-every", "0", "--set", "transform.min_size=96", "--set", "transform.max_size=96"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert re.search(TIMESTAMP + r" INFO maskstream.progress: eval: 2/2 images \(100%\)", err), err


# ----------------------------------------------------------------------------- help


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _commands(parser, prefix=""):
    """Every (sub)command's parser by its full name, e.g. 'fleet add', nested groups included."""
    for name, sub in _subparsers(parser).items():
        yield prefix + name, sub
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            yield from _commands(sub, prefix + name + " ")


def test_help_shows_every_default_an_example_and_the_version(capsys):
    parser = build_parser()
    for name, sub in _commands(parser):
        text = " ".join(sub.format_help().split())
        assert "examples: maskstream " + name in text, name
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings}: no help"
            if action.default not in (None, False, [], argparse.SUPPRESS):  # a default worth showing
                assert "%(default)" in formatter._get_help_string(action), (name, action.option_strings)
                shown = formatter._get_help_string(action) % {**vars(action), "prog": name}
                assert f"(default: {action.default})" in shown
                assert shown.count("(default") == 1, shown  # said once, not by the help and the formatter both
                assert " ".join(shown.split()) in text  # as rendered
            else:  # what happens without the option is in its help, where it matters
                assert "%(default)" not in formatter._get_help_string(action)
    run_help = " ".join(_subparsers(parser)["run"].format_help().split())
    assert "when stderr is not a terminal: a timestamped progress line this often (default: 10.0)" in run_help
    assert "(default: a new runs/run-N)" in run_help and "default: the bundled bundled_lite_shapes" in run_help
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and re.fullmatch(r"maskstream \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_bare_maskstream_lists_the_commands_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    for command in ("run", "segment", "bench", "subscribe", "train", "eval", "doctor"):
        assert f"\n    {command}" in err
    assert "examples:" in err


# ----------------------------------------------------------------------------- results from files


def test_read_jsonl_gives_back_the_detections_the_subscriber_would(tmp_path):
    path = tmp_path / "r.jsonl"
    sent = []
    with JsonlWriter(path) as writer:
        for seq in range(3):
            det, _ = make_detections("cam0", seq)
            writer.write(det)
            sent.append(det)
        writer.write(EndOfStream(Header("cam0", 3), "camera went away"))
    back = list(read_jsonl(path))
    assert [type(m) for m in back] == [Detections] * 3 + [EndOfStream] and back[-1].error == "camera went away"
    for a, b in zip(sent, back):
        assert b.header.stream_id == "cam0" and b.header.seq == a.header.seq and b.header.stamps == a.header.stamps
        assert np.array_equal(masks(a), masks(b))  # the masks exactly
        assert np.allclose(a.boxes, b.boxes, atol=0.005) and np.allclose(a.scores, b.scores, atol=5e-5)
        assert b.class_names == a.class_names and b.labels.dtype == np.int32 and b.boxes.dtype == np.float32
        assert to_json(b, gap=0) == json.loads(path.read_text().splitlines()[b.header.seq])
    assert list(read_jsonl(path, streams=["other"])) == []
    segment_line = {"image": "photos/a.jpg", **{k: v for k, v in to_json(sent[0]).items()
                                                if k in ("height", "width", "detections")}}
    det = from_json(segment_line, default_seq=4)
    assert (det.header.stream_id, det.header.seq) == ("a", 4) and np.array_equal(masks(det), masks(sent[0]))
    path.write_text(path.read_text() + '{"kind": "Detections", "stream_id"\n')  # cut short by a crash
    with pytest.raises(ValueError, match=r"r.jsonl: line 5: not a maskstream record"):
        list(read_jsonl(path))
