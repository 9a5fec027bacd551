"""The whole pipeline for real: stage processes, ZeroMQ sockets, shared memory, video files,
a real RTSP server, a subscriber and the metrics endpoint.

A tiny untrained lite model (128x160 input, 5 detections, score threshold 0, seeded heads)
keeps a frame at ~0.1 s on a CPU and gives deterministic detections."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
import zmq
from maskstream.model.postprocess import paste_mask_cropped
from maskstream.model.rle import decode_rle
from maskstream.pipeline.client import Subscriber
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, RawDetections
from maskstream.pipeline.runtime.stage import Timed
from maskstream.pipeline.stages.postprocess import rescale_boxes

from tests.pipeline_runs import AFTER_INFERENCE_S, INFER_STALENESS_S, ROOT, STAGES, TINY_MODEL_SETS
from tests.shared_data import DATA, require


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return (write_test_clip(folder / "a.mp4", frames=12, size=(160, 120)),
            write_test_clip(folder / "b.mp4", frames=8, size=(200, 120)))


def maskstream_run(args, tmp_path, extra_sets=(), wait=True, model_sets=TINY_MODEL_SETS, **kw):
    sets = [x for s in (*model_sets, *extra_sets) for x in ("--set", s)]
    cmd = [sys.executable, "-m", "maskstream.pipeline.cli", "run", "--quiet", "--out-dir", str(tmp_path / "out"),
           *sets, *args, "--set", f"transport.endpoint_dir={tmp_path}"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if not wait:
        return process
    out, err = process.communicate(timeout=150)
    return process.returncode, out, err


def detections(path):
    """JSONL lines without the timestamps (which differ between runs)."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    for line in lines:
        line.pop("stamps")
    return lines


def leftover_segments(pid):
    return [p for p in os.listdir("/dev/shm") if p.startswith(f"maskstream-{pid}-")]


def test_offline_every_frame_once_in_order_and_identical_for_1_and_3_workers(clips, tmp_path):
    a, b = clips
    outputs = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}.jsonl"
        code, stdout, stderr = maskstream_run(
            ["--source", str(a), "--source", str(b), "--out", str(out), "--coco", str(tmp_path / f"w{workers}.json"),
             "--workers", str(workers)], tmp_path)
        assert code == 0, stderr
        assert "20 frames" in stdout
        outputs[workers] = detections(out)
    for stream, frames in (("a", 12), ("b", 8)):
        lines = [line for line in outputs[1] if line["stream_id"] == stream]
        assert [line["seq"] for line in lines] == [*range(frames), frames]  # every frame in order, then EOS
        assert lines[-1]["kind"] == "EndOfStream" and lines[-1]["error"] == ""
        assert all(len(line["detections"]) == 5 for line in lines[:-1])
    key = lambda line: (line["stream_id"], line["seq"])  # noqa: E731 - streams interleave differently per run
    assert sorted(outputs[1], key=key) == sorted(outputs[3], key=key)
    coco = json.loads((tmp_path / "w3.json").read_text())
    assert len(coco) == 20 * 5


def test_masks_pasted_in_the_inference_process_publish_what_postprocess_pastes(clips, tmp_path):
    """infer.masks crops (the masks pasted and thresholded where the model ran, their crops sent)
    against probs (postprocess pastes the probabilities): every line the same, boxes, labels and
    scores exactly, each mask's pixels too except where the pasted probability lies within one
    float32 step of the threshold; those probabilities from the run's own stages, in this process."""
    a, _ = clips
    lines, sets = {}, [*TINY_MODEL_SETS, "infer.masks=probs"]
    for masks in ("probs", "crops"):
        out = tmp_path / f"{masks}.jsonl"
        code, _, stderr = maskstream_run(["--source", str(a), "--out", str(out), "--decode", "cpu", "--masks", masks],
                                         tmp_path)
        assert code == 0, stderr
        lines[masks] = detections(out)
    assert [line["seq"] for line in lines["crops"]] == list(range(13))  # 12 frames + EndOfStream
    reference = _raw_detections_in_process(a, sets)
    step, differing, total = float(np.finfo(np.float32).eps), 0, 0
    for probs_line, crops_line in zip(lines["probs"], lines["crops"], strict=True):
        masks_of = [[d.pop("mask") for d in line.get("detections", [])] for line in (probs_line, crops_line)]
        assert crops_line == probs_line  # everything but the masks
        if probs_line["kind"] == "EndOfStream":
            continue
        raw = reference[probs_line["seq"]]
        frame_hw = (probs_line["height"], probs_line["width"])
        boxes = rescale_boxes(np.asarray(raw.boxes), raw.valid_hw, frame_hw)
        for i, (expected, got) in enumerate(zip(*masks_of, strict=True)):
            assert got["crop_box"] == expected["crop_box"]
            pasted, (x0, y0) = paste_mask_cropped(raw.mask_probs[i], boxes[i], frame_hw)
            assert [x0, y0, x0 + pasted.shape[1], y0 + pasted.shape[0]] == expected["crop_box"]
            # the in-process reference is the run's own computation: its threshold gives the probs run's mask
            near = np.abs(pasted - np.float32(0.5)) <= step
            assert np.array_equal((pasted > 0.5)[~near], decode_rle(expected["rle"]).astype(bool)[~near])
            differ = decode_rle(expected["rle"]) != decode_rle(got["rle"])
            assert not (differ & ~near).any(), (probs_line["seq"], i)
            differing, total = differing + int(differ.sum()), total + differ.size
    assert total > 10**4 and differing <= total * 1e-4


def _raw_detections_in_process(clip: Path, sets: list[str]) -> dict[int, RawDetections]:
    """The RawDetections (probabilities) of a run of `clip` with `sets`, by seq: its planned decode,
    preprocess and inference stages run in this process, one torch thread as its inference process has."""
    import torch
    from maskstream.pipeline.cli.main import build_parser
    from maskstream.pipeline.cli.run import run_config
    from maskstream.pipeline.run_config import plan
    from maskstream.pipeline.stages.decode import DecodeStage
    from maskstream.pipeline.stages.infer import InferStage
    from maskstream.pipeline.stages.preprocess import PreprocessStage

    cfg = run_config(build_parser().parse_args(["run", "--source", str(clip), "--decode", "cpu",
                                                *[x for s in sets for x in ("--set", s)]]))
    planned = plan(cfg)
    planned.close()
    specs = {spec.name: spec for spec in planned.specs}
    threads = torch.get_num_threads()
    torch.set_num_threads(specs["infer.0"].wiring.torch_threads)
    try:
        decode = DecodeStage(next(spec.config for name, spec in specs.items() if name.startswith("decode.")))
        preprocess, infer = PreprocessStage(specs["preprocess.0"].config), InferStage(specs["infer.0"].config)
        outputs = []
        for frame in decode.messages():
            outputs += infer.process(frame if isinstance(frame, EndOfStream) else preprocess.process(frame))
    finally:
        torch.set_num_threads(threads)
    raws = [out.message if isinstance(out, Timed) else out for out in outputs]
    return {raw.header.seq: raw for raw in raws if isinstance(raw, RawDetections)}


@pytest.mark.slow
def test_real_video_every_frame_accounted_and_same_for_two_runs_with_1_and_3_workers(tmp_path):
    video = require(DATA / "videos" / "asl_walk.mkv")
    runs = []
    for i, workers in enumerate((1, 1, 3)):
        out = tmp_path / f"r{i}.jsonl"
        code, stdout, stderr = maskstream_run(["--source", str(video), "--out", str(out), "--workers", str(workers)],
                                              tmp_path)
        assert code == 0, stderr
        runs.append(detections(out))
    assert [line["seq"] for line in runs[0]] == list(range(90))  # 89 frames + EndOfStream
    assert runs[0] == runs[1] == runs[2]  # one stream: publish restores its order whatever the workers


def test_bad_sources_fail_alone_with_clear_errors(clips, tmp_path):
    """Sources that fail during the run. (One that cannot work at all, such as a file that is no
    video, is refused before the run starts: tests/test_cli_ux.py.)"""
    a, _ = clips
    truncated = tmp_path / "cut.mp4"  # its first frames decode (the start-up probe passes), then it ends early
    truncated.write_bytes(Path(a).read_bytes()[: Path(a).stat().st_size * 4 // 5])
    unreachable = f"rtsp://127.0.0.1:{free_port()}/camera"  # nothing listens there
    out = tmp_path / "r.jsonl"
    code, stdout, stderr = maskstream_run(
        ["--source", str(a), "--source", str(truncated), "--source", f"camera={unreachable}",
         "--out", str(out)], tmp_path, ["source.max_reconnects=1", "source.reconnect_backoff_s=[0.1, 0.2]"])
    assert code == 1, stderr
    assert "a (" in stdout and "12 frames" in stdout
    [cut_line] = [line for line in stdout.splitlines() if line.strip().startswith("cut (")]
    assert "FAILED" in cut_line
    [camera_line] = [line for line in stdout.splitlines() if line.strip().startswith("camera (")]
    assert unreachable in camera_line and "FAILED" in camera_line and "gave up" in camera_line
    assert stderr.count("not reachable now") == 1 and "will retry it" in stderr  # said once, at start
    lines = detections(out)
    ends = {line["stream_id"]: line for line in lines if line["kind"] == "EndOfStream"}
    assert ends["a"]["error"] == "" and ends["cut"]["error"]
    assert unreachable in ends["camera"]["error"] and "ConnectionRefused" in ends["camera"]["error"]
    assert len([line for line in lines if line["stream_id"] == "a"]) == 13


def test_wrong_engine_is_a_clear_startup_failure(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    clip = write_test_clip(tmp_path / "c.mp4", frames=3)
    code, stdout, stderr = maskstream_run(["--source", str(clip), "--engine", str(engine)], tmp_path)
    # Refused while the run is planned (the manifest gives every stage its inference contract),
    # before any stage process exists: no run summary, nothing written.
    assert code == 2
    assert f"error: {engine}: no manifest model.json beside the engine" in stderr
    assert "frames in" not in stdout and not (tmp_path / "out").exists()


# Offline, a decoder runs ahead of publish by what the rings and socket pipes hold: ~20 frames
# measured, loaded or quiet; 44 at most here (two high-water marks per socket pipe, each ring's slots).
# Killed once 3 of its frames are published, the decoder of SLOW_FRAMES is certainly mid-stream.
SLOW_FRAMES = 100


def test_killed_decoder_is_restarted_and_its_stream_stays_exact(tmp_path):
    slow = write_test_clip(tmp_path / "slow.mp4", frames=SLOW_FRAMES, size=(160, 120))
    other = write_test_clip(tmp_path / "other.mp4", frames=10, size=(160, 120))
    out = tmp_path / "r.jsonl"
    run = maskstream_run(["--source", str(slow), "--source", str(other), "--out", str(out)], tmp_path, wait=False)
    try:
        decoder = _wait_for_stage(run.pid, "decode", "slow", out, min_lines=3)
        killed_at = time.monotonic()  # CLOCK_MONOTONIC, as the decoders' source stamps
        os.kill(decoder, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=150)
    finally:
        run.kill()
    assert run.returncode == 0, stderr
    assert "stage decode.slow restarted 1 time(s)" in stdout
    lines = detections(out)
    assert [line["seq"] for line in lines if line["stream_id"] == "slow"] == list(range(SLOW_FRAMES + 1))
    assert [line["seq"] for line in lines if line["stream_id"] == "other"] == list(range(11))
    assert not leftover_segments(run.pid)
    # Killed mid-stream: the restarted decoder decoded the rest of the stream and its end, so the
    # stream is exact because the restart resumed it, not because the dead decoder had sent it all.
    decoded_at = {(line["seq"], line["kind"]): line["stamps"][0]["start"]
                  for line in map(json.loads, out.read_text().splitlines()) if line["stream_id"] == "slow"}
    assert decoded_at[SLOW_FRAMES, "EndOfStream"] > killed_at
    assert any(at > killed_at for (_, kind), at in decoded_at.items() if kind == "Detections")


def test_malformed_message_to_a_stage_is_counted_and_the_stage_goes_on(clips, tmp_path):
    a, _ = clips
    out = tmp_path / "r.jsonl"
    run = maskstream_run(["--source", str(a), "--out", str(out)], tmp_path, wait=False)
    try:
        _wait_for_stage(run.pid, "infer", None, out, min_lines=1)
        [folder] = [p for p in tmp_path.iterdir() if p.name.startswith("maskstream-")]
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.connect(f"ipc://{folder / 'postprocess-0'}")
        push.send_multipart([b"a", b"\xc1garbage", b""])
        push.close(linger=2000)
        context.term()
        stdout, stderr = run.communicate(timeout=150)
    finally:
        run.kill()
    assert run.returncode == 0, stderr
    assert "1 malformed message(s) ignored" in stdout
    assert "postprocess" in stderr and "malformed message on ipc://" in stderr and "msgpack" in stderr
    assert [line["seq"] for line in detections(out)] == list(range(13))


def test_sigint_drains_an_offline_run(tmp_path):
    clip = write_test_clip(tmp_path / "long.mp4", frames=200, size=(160, 120))
    out = tmp_path / "r.jsonl"
    run = maskstream_run(["--source", str(clip), "--out", str(out)], tmp_path, wait=False)
    try:
        _wait_for_stage(run.pid, "infer", None, out, min_lines=3)
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130, stderr
    lines = detections(out)
    assert lines[-1]["kind"] == "EndOfStream" and "interrupted" in lines[-1]["error"]
    assert [line["seq"] for line in lines] == list(range(len(lines)))  # in order, no holes
    assert len(lines) < 201
    assert not leftover_segments(run.pid)


def test_run_without_source_runs_the_sample_clip_into_the_default_outputs(tmp_path):
    """The README's main job: the bundled model on the generated clip, scored against its ground truth."""
    code, stdout, stderr = maskstream_run([], tmp_path, model_sets=())
    assert code == 0, stderr
    assert "no --source given" in stderr and "sample_clip.mp4" in stderr and "bundled model" in stderr
    out = tmp_path / "out"
    assert "50 frames" in stdout and str(out / "annotated.mp4") in stdout
    lines = detections(out / "results.jsonl")
    assert [line["seq"] for line in lines] == list(range(51)) and lines[-1]["kind"] == "EndOfStream"
    assert {r["image_id"] for r in json.loads((out / "coco_results.json").read_text())} <= set(range(50))
    # Measured: bbox AP 0.918, segm AP 0.967 (the clip's shapes are what the bundled model learned)
    score = re.search(r"ground truth \(sample_clip_annotations.json\): bbox AP ([\d.]+), segm AP ([\d.]+)", stdout)
    assert score is not None, stdout
    assert float(score.group(1)) >= 0.8 and float(score.group(2)) >= 0.85, stdout
    with av.open(str(out / "annotated.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == 50


@pytest.mark.slow
def test_live_rtsp_every_frame_published_or_counted_latency_bounded_and_reconnects(rtsp_server, tmp_path):
    video = DATA / "videos" / "car-detection.mp4"
    if not video.exists():  # the shared videos are not shipped; a generated clip serves as well
        if "libx264" not in av.codecs_available:
            pytest.skip("the RTSP server sends H.264 as is, and this FFmpeg has no libx264 to make a clip")
        video = write_test_clip(tmp_path / "camera.mp4", frames=250, size=(320, 240), fps=12.5, codec="libx264")
    server = rtsp_server(video, loop=True)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    received: list[Detections] = []
    with Subscriber(endpoint, timeout_s=60) as subscriber:
        run = maskstream_run(["--source", server.url, "--publish", endpoint], tmp_path,
                             ["source.reconnect_backoff_s=[0.2, 1.0]"], wait=False)
        try:
            _receive(subscriber, received, count=15)
            server.kill()  # like a camera losing power: PyAV just sees the stream end
            server.start()
            restarted_at = time.monotonic()
            _receive(subscriber, received, count=10, after=restarted_at)
            run.send_signal(signal.SIGINT)
            stdout, stderr = run.communicate(timeout=60)
        finally:
            run.kill()
    assert run.returncode == 130, stderr
    assert "restarted" not in stdout  # the decoder reconnected by itself, nothing was restarted
    _check_every_frame_published_or_counted(received)
    for message in received:
        stamps = {s.stage: s for s in message.header.stamps}
        assert stamps["infer"].start - stamps["source"].start <= INFER_STALENESS_S
        assert stamps["publish"].end - stamps["source"].start <= INFER_STALENESS_S + AFTER_INFERENCE_S


FAST_FRAMES = 720


def test_live_overload_drops_counted_latency_bounded_and_metrics_served(tmp_path):
    # 60 frames/s for 12 s: the tiny model does about 5-25 on this box (loaded or quiet), so many
    # frames must be dropped, every drop counted, and the latency must stay bounded instead of
    # queues growing.
    clip = write_test_clip(tmp_path / "fast.mp4", frames=FAST_FRAMES, size=(160, 120), fps=60)
    port = free_port()
    out = tmp_path / "r.jsonl"
    run = maskstream_run(["--source", str(clip), "--policy", "live", "--out", str(out), "--metrics-port", str(port)],
                         tmp_path, wait=False)
    try:
        # Each stage reports its counters with its heartbeat: wait until every one has, and some
        # stage has counted drops (which one depends on where the queue forms: decode, or
        # inference dropping overtaken frames).
        wanted = [re.escape(f'maskstream_frames_out_total{{stage="{stage}",stream="fast"}}') for stage in STAGES]
        dropped = r'maskstream_dropped_frames_total\{stage="\w+",stream="fast"\} [1-9]'
        metrics = _scrape_until(f"http://127.0.0.1:{port}/metrics", [*wanted, dropped])
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stderr
    for stage in STAGES[1:]:  # decode is a source: no input
        assert f'maskstream_frames_in_total{{stage="{stage}",stream="fast"}}' in metrics
    assert 'maskstream_end_to_end_seconds_bucket{stage="publish",stream="fast",le="+Inf"}' in metrics

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    end = lines[-1]
    assert end["kind"] == "EndOfStream" and end["error"] == "" and end["seq"] == FAST_FRAMES
    published = lines[:-1]
    # Every frame the source produced is either published or counted as dropped by some stage.
    assert len(published) + sum(end["drops"].values()) == FAST_FRAMES
    assert sum(end["drops"].values()) > FAST_FRAMES // 4
    assert f"fast ({clip}): {len(published)} frames, {sum(end['drops'].values())} lost/dropped, ok" in stdout
    previous = None
    for line in published:
        stamps = {s["stage"]: s for s in line["stamps"]}
        assert stamps["infer"]["start"] - stamps["source"]["start"] <= INFER_STALENESS_S
        assert stamps["postprocess"]["end"] - stamps["source"]["start"] <= INFER_STALENESS_S + AFTER_INFERENCE_S
        if previous is not None:  # a gap in seq is exactly the drops counted in between
            assert line["seq"] - previous["seq"] - 1 == sum(line["drops"].values()) - sum(previous["drops"].values())
        previous = line


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _receive(subscriber, received, count, after=None, timeout_s=90):
    """Append Detections to `received` until `count` more arrived (decoded after `after`, if given)."""
    deadline, got = time.monotonic() + timeout_s, 0
    while got < count:
        assert time.monotonic() < deadline, f"only {got} of {count} frames within {timeout_s} s"
        message = subscriber.recv()
        if isinstance(message, Detections):
            received.append(message)
            got += after is None or message.header.stamps[0].start > after


def _check_every_frame_published_or_counted(received):
    """Between two received frames, the seq gap equals the growth of the drop counters."""
    for previous, message in zip(received, received[1:]):
        gap = message.header.seq - previous.header.seq - 1
        counted = sum(n for _, n in message.header.drops) - sum(n for _, n in previous.header.drops)
        assert gap == counted, (previous.header, message.header)


def _scrape_until(url, wanted, timeout_s=90):
    """The metrics page, once every regular expression in `wanted` matches it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            if all(re.search(w, text) for w in wanted):
                return text
        except OSError:
            pass  # not listening yet
        time.sleep(0.3)
    raise AssertionError(f"{url} never showed {wanted!r}")


def _wait_for_stage(run_pid, kind, stream, out, min_lines, timeout_s=90):
    """pid of the run's `kind` stage process (for decode, the decoder of `stream`), once `out` has
    min_lines lines (of `stream`, if given).

    A stage process only names itself once spawn has started it and imported its modules, which
    takes seconds on a loaded box: until then its comm is still "python". Lines of another stream
    say nothing about that, hence lines of `stream` (its decoder sent them, so it has its name);
    the name is still waited for, not read once."""
    deadline = time.monotonic() + timeout_s
    while _lines_of(out, stream) < min_lines:
        assert time.monotonic() < deadline, f"{out} did not reach {min_lines} lines of {stream or 'any stream'}"
        time.sleep(0.1)
    while True:
        children = subprocess.run(["pgrep", "-P", str(run_pid)], capture_output=True, text=True).stdout.split()
        for pid in children:
            try:
                # a stage names itself as it starts (pipeline.runtime.titles): `ps -f` shows "maskstream: decode.cam0"
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"maskstream: ") and _stage_of(
                        int(pid)) == (kind, stream):
                    return int(pid)
            except OSError:
                pass  # exited since pgrep
        assert time.monotonic() < deadline, f"no {kind} stage among {children}"
        time.sleep(0.1)


def _lines_of(out, stream):
    """Complete lines in `out` (of `stream`, if not None); publish may be writing the last one."""
    if not out.exists():
        return 0
    lines = out.read_text().split("\n")[:-1]
    return len(lines) if stream is None else sum(json.loads(line)["stream_id"] == stream for line in lines)


def _stage_of(pid):
    # The stage process writes its name ("decode.slow", "infer.0") to /proc/self/comm as it starts
    # (pipeline.runtime.stage._setup_process; /proc keeps 15 characters); before that it reads "python".
    name = Path(f"/proc/{pid}/comm").read_text().strip()
    kind, _, stream = name.partition(".")
    return kind, (stream or None) if kind == "decode" else None
