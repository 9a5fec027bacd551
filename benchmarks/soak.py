"""Soak: a live source over the pipeline's capacity for many minutes, with a stage process killed
every minute. Does memory stay flat, and is every frame published or counted as dropped?

    python benchmarks/soak.py [--duration-s 660] [--kill-every-s 60] [--rate 25] [--model bundled]
        [--workers 1] [--out PATH] [--smoke]

The source is a generated video file played live (`--policy live`, source.rate_fps = --rate), long
enough to last --duration-s; --rate above what the model sustains on this host keeps the pipeline
over capacity, so frames are dropped all along (newest wins) and counted. `maskstream run` publishes
on a loopback tcp endpoint; a subscriber here reads every message. Every --kill-every-s after the
first frame arrives, one stage process gets SIGKILL, in turn: inference, preprocess, postprocess,
publish, decode, ... (the last one --kill-every-s before the source's --duration-s is over, so that
the last window is measured after the restarts have settled). The supervisor restarts each.

Every second the resident memory (RSS, /proc) of the supervisor and of each stage process is
sampled, by stage name (a restarted stage keeps its name). Memory is flat when each one's median
RSS in the last window (the final interval, less its first quarter) is within 5% of its median in the
first (the first interval, less its first quarter: a stage's memory settles after its first frames).

Frames: the stream's EndOfStream says how many frames the source produced (its seq) and how many each
stage dropped (its drops); the run's own summary says how many it published and lost or dropped; the
run's journal (--out JSONL, kept here) holds every frame published, once. Every frame is accounted
for when published + dropped = produced, in the run's summary and in the journal (its distinct seqs,
none twice, + the EndOfStream's drops). The subscriber's view is checked against the journal: it
receives nothing the journal lacks, nothing twice, and misses only frames published around a restart
of publish (docs/delivery.md: one killed between its journal line and its PUB send costs subscribers
that frame, and PUB/SUB loses what a new publisher sends before a subscriber's reconnection reaches it;
both show to the subscriber as gaps in seq). Writes soak_<model>.json (see --out) with the load
average of the host before and after (a busy host slows the pipeline; the source keeps its rate).

--smoke: the tiny model, 8 s of source at 30 frames/s with one kill, 3 s after the first frame.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from maskstream.pipeline.bench.measure import machine
from maskstream.pipeline.bench.smoke import tiny_run_overrides
from maskstream.pipeline.client import Subscriber
from maskstream.pipeline.media.video import VideoWriter
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, MessageError
from options import add_output_options, parse_args, results_file

STREAM = "soak"  # the clip's stem: the stream id, and decode's process name decode.soak
KILL_ORDER = ("infer.0", "preprocess.0", "postprocess.0", "publish.0", f"decode.{STREAM}")
FLAT = 0.05  # relative change of median RSS allowed between the first and the last window
# A frame the subscriber misses counts as publish's restart's when it was published this soon after a
# kill of publish: its process start, imports and journal recovery come first (seconds on a busy host).
AFTER_PUBLISH_KILL_S = 30.0
SIZE = (320, 240)  # width, height of the generated clip


def write_clip(path: Path, frames: int, fps: float) -> Path:
    """`frames` frames of a square and a disc gliding over a gradient (cheap to make, any length)."""
    width, height = SIZE
    ys, xs = np.mgrid[0:height, 0:width]
    background = np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1), np.full_like(xs, 96)],
                          axis=-1).astype(np.uint8)  # [H, W, 3]
    radius = height // 6
    with VideoWriter(path, fps, width, height) as writer:
        for n in range(frames):
            image = background.copy()
            phase = 2 * math.pi * n / 250
            x0 = int((width - 2 * radius) * (0.5 + 0.45 * math.sin(phase)))
            image[height // 2 : height // 2 + radius, x0 : x0 + radius] = (240, 40, 40)
            cx, cy = width // 2 + int(width / 4 * math.cos(phase)), height // 3
            image[(xs - cx) ** 2 + (ys - cy) ** 2 < radius**2] = (40, 40, 240)
            writer.write(image)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver(threading.Thread):
    """Reads every message the run publishes: the Detections' seqs, the EndOfStream."""

    def __init__(self, endpoint: str):
        super().__init__(name="receiver", daemon=True)
        self.endpoint = endpoint
        self.seqs: list[int] = []
        self.end: EndOfStream | None = None
        self.first_at: float | None = None
        self.end_at: float | None = None
        self.malformed = 0
        self.stop = threading.Event()
        self.connected = threading.Event()

    def run(self) -> None:
        with Subscriber(self.endpoint, streams=[STREAM], high_water_mark=1_000_000) as subscriber:
            self.connected.set()
            while not self.stop.is_set():
                try:
                    message = subscriber.recv(timeout_s=0.2)
                except TimeoutError:
                    continue
                except MessageError:
                    self.malformed += 1
                    continue
                if isinstance(message, Detections):
                    self.seqs.append(message.header.seq)
                    if self.first_at is None:
                        self.first_at = time.monotonic()
                elif isinstance(message, EndOfStream):
                    self.end, self.end_at = message, time.monotonic()


def processes(root: int) -> dict[str, int]:
    """{name: pid} of the run: "supervisor" (the `maskstream run` process) and its children that have
    named themselves after their stage (/proc/PID/comm, which the stage loop sets as it starts)."""
    found = {"supervisor": root}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[1]) != root:
                continue
            name = Path(f"/proc/{entry}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if "." in name:  # a stage ("infer.0", "decode.soak"), not the resource tracker or a process still starting
            found[name] = int(entry)
    return found


def rss_mb(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def window_median(samples: list[tuple[float, dict[str, float]]], name: str, start: float, end: float) -> float | None:
    values = [rss[name] for at, rss in samples if start <= at < end and name in rss]
    return statistics.median(values) if values else None


def summary_counts(stdout: str) -> dict[str, Any]:
    """The run's own summary (pipeline/cli/run.py): the stream's published and lost/dropped frames, restarts."""
    stream = re.search(rf"^  {STREAM} \(.*\): (\d+) frames, (\d+) lost/dropped, (.*)$", stdout, re.MULTILINE)
    restarts = {name: int(count) for name, count in re.findall(r"^  stage (\S+) restarted (\d+) time", stdout,
                                                              re.MULTILINE)}
    if stream is None:
        return {"published": None, "lost_or_dropped": None, "state": None, "restarts": restarts}
    return {"published": int(stream.group(1)), "lost_or_dropped": int(stream.group(2)), "state": stream.group(3),
            "restarts": restarts}


def journal_frames(path: Path) -> list[tuple[int, float]]:
    """(seq, when publish released it: its last stamp's end) of every Detections line in the run's journal."""
    if not path.exists():
        return []
    frames = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "Detections":
            frames.append((int(record["seq"]), max(s["end"] for s in record["stamps"])))
    return frames


def soak(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    frames = int(args.duration_s * args.rate)
    clip = write_clip(folder / f"{STREAM}.mp4", frames, args.rate)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    receiver = Receiver(endpoint)
    receiver.start()
    receiver.connected.wait(10)
    sets = ["source.policy=live", f"source.rate_fps={args.rate}", f"supervisor.max_restarts={args.max_restarts}",
            *(tiny_run_overrides() if args.model == "tiny" else []), *args.set]
    journal = folder / "journal.jsonl"
    command = [sys.executable, "-m", "maskstream.pipeline.cli", "run", "--quiet", "--source", str(clip),
               "--publish", endpoint, "--out", str(journal), "--workers", str(args.workers),
               "--out-dir", str(folder / "out"),
               *(x for s in sets for x in ("--set", s))]
    load_before = machine()
    started = time.monotonic()
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    output: dict[str, str] = {}
    readers = [threading.Thread(target=lambda name, pipe: output.__setitem__(name, pipe.read()), args=(name, pipe),
                                daemon=True) for name, pipe in (("stdout", run.stdout), ("stderr", run.stderr))]
    for reader in readers:
        reader.start()
    samples: list[tuple[float, dict[str, float]]] = []  # (seconds after the first frame, {name: RSS MB})
    kills: list[dict[str, Any]] = []
    deadline = started + args.duration_s * 2 + 600  # a run that never ends (a bug) is stopped, and says so
    try:
        while run.poll() is None and time.monotonic() < deadline:
            time.sleep(args.sample_s)
            if receiver.first_at is None:
                continue
            at = time.monotonic() - receiver.first_at
            pids = processes(run.pid)
            rss = {name: mb for name, pid in pids.items() if (mb := rss_mb(pid)) is not None}
            if receiver.end is None:
                samples.append((at, rss))
            due = (len(kills) + 1) * args.kill_every_s
            if receiver.end is None and at >= due and due <= args.duration_s - args.kill_every_s:
                name = KILL_ORDER[len(kills) % len(KILL_ORDER)]
                if name in pids:  # else it is being restarted still: try again at the next sample
                    os.kill(pids[name], signal.SIGKILL)
                    kills.append({"at_s": round(at, 1), "stage": name, "pid": pids[name],
                                  "monotonic": time.monotonic()})
                    print(f"{at:7.1f} s: killed {name} (pid {pids[name]})", flush=True)
    finally:
        timed_out = run.poll() is None
        if timed_out:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        for reader in readers:
            reader.join(30)
        time.sleep(1.0)  # what was published last
        receiver.stop.set()
        receiver.join(10)
    elapsed = time.monotonic() - started
    end_at = (receiver.end_at or time.monotonic()) - (receiver.first_at or started)
    settle = args.kill_every_s / 4
    windows = {"first": (settle, args.kill_every_s), "last": (end_at - args.kill_every_s + settle, end_at)}
    names = sorted({name for _, rss in samples for name in rss})
    memory = {}
    for name in names:
        first, last = (window_median(samples, name, *windows[w]) for w in ("first", "last"))
        ratio = last / first if first and last else None
        memory[name] = {"first_window_mb": first, "last_window_mb": last, "ratio": ratio,
                        "flat": ratio is not None and abs(ratio - 1) <= FLAT}
    totals = [(at, {"total": sum(rss.values())}) for at, rss in samples if set(rss) >= set(KILL_ORDER)]
    first_total, last_total = (window_median(totals, "total", *windows[w]) for w in ("first", "last"))

    summary = summary_counts(output.get("stdout", ""))
    end = receiver.end
    produced = end.header.seq if end is not None else None
    end_drops = sum(n for _, n in end.header.drops) if end is not None else None
    received = len(set(receiver.seqs))
    reported = (summary["published"] + summary["lost_or_dropped"]
                if summary["published"] is not None else None)
    published = journal_frames(journal)  # seq -> when publish released it (host monotonic clock)
    journal_seqs = [seq for seq, _ in published]
    in_journal = dict(published)
    publish_kills = [k["monotonic"] for k in kills if k["stage"].startswith("publish")]
    missed = sorted(set(in_journal) - set(receiver.seqs))
    after_kill = [seq for seq in missed
                  if any(0 <= in_journal[seq] - at <= AFTER_PUBLISH_KILL_S for at in publish_kills)]
    for kill in kills:
        kill.pop("monotonic")
    return {
        "what": "soak: a live source over capacity, a stage killed every interval; RSS per process and every "
                "frame's fate",
        "command": shlex.join(sys.argv),
        "run_command": shlex.join(command),
        "machine": {**load_before, "load_average_before": load_before["load_average"],
                    "load_average_after": os.getloadavg()},
        "model": args.model, "workers": args.workers, "rate_fps": args.rate, "clip": {"frames": frames,
                                                                                     "size": list(SIZE)},
        "duration_s": args.duration_s, "kill_every_s": args.kill_every_s, "sample_s": args.sample_s,
        "elapsed_s": round(elapsed, 1), "stream_s": round(end_at, 1),
        "exit_code": run.returncode, "timed_out": timed_out,
        "kills": kills, "restarts": summary["restarts"],
        "windows_s": {w: [round(a, 1), round(b, 1)] for w, (a, b) in windows.items()},
        "rss": memory,
        "rss_total": {"first_window_mb": first_total, "last_window_mb": last_total,
                      "ratio": last_total / first_total if first_total and last_total else None},
        "rss_flat": bool(memory) and all(m["flat"] for m in memory.values()),
        "rss_samples": [[round(at, 1), {k: round(v, 1) for k, v in rss.items()}]  # every 5th, for plots
                        for at, rss in samples[::5]],
        "frames": {
            "produced": produced,  # the source's count: its EndOfStream's seq
            "published_run": summary["published"], "lost_or_dropped_run": summary["lost_or_dropped"],
            "state_run": summary["state"],
            "received": received, "received_twice": len(receiver.seqs) - received,
            "dropped_end_of_stream": end_drops,
            "unaccounted_run": produced - reported if produced is not None and reported is not None else None,
            "unaccounted_subscriber": produced - received - end_drops
                                      if produced is not None and end_drops is not None else None,
            "accounted_run": produced is not None and reported == produced,
            "accounted_subscriber": produced is not None and end_drops is not None
                                    and received + end_drops == produced,
            "malformed": receiver.malformed,
            # The journal: every frame published, each once
            "published_journal": len(set(journal_seqs)),
            "published_twice_journal": len(journal_seqs) - len(set(journal_seqs)),
            "accounted_journal": produced is not None and end_drops is not None and journal_seqs != []
                                 and len(journal_seqs) == len(set(journal_seqs)) == summary["published"]
                                 and len(journal_seqs) + end_drops == produced,
            # The subscriber against the journal
            "received_not_published": len(set(receiver.seqs) - set(in_journal)),
            "missed_by_subscriber": len(missed),
            "missed_after_publish_kill": len(after_kill),
            "missed_seqs": missed[:100],
            "subscriber_consistent": not set(receiver.seqs) - set(in_journal) and len(after_kill) == len(missed)
                                     and len(receiver.seqs) == received,
        },
        "stdout_tail": output.get("stdout", "")[-2000:],  # the run's summary
        "stderr_tail": output.get("stderr", "")[-3000:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=660.0, help="how long the source plays")
    parser.add_argument("--kill-every-s", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=25.0, help="frames/s the source plays at")
    parser.add_argument("--model", choices=["bundled", "tiny"], default="bundled",
                        help="bundled: the product's default model; tiny: pipeline.bench.smoke's")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling interval")
    parser.add_argument("--max-restarts", type=int, default=100, help="supervisor.max_restarts")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more run config overrides")
    add_output_options(parser)
    args = parse_args(parser, {"duration_s": 8.0, "kill_every_s": 3.0, "rate": 30.0, "model": "tiny"}, argv)
    out = results_file(parser, args, f"soak_{args.model}.json")
    with tempfile.TemporaryDirectory(prefix="maskstream-soak-") as folder:
        result = soak(args, Path(folder))
    result["smoke"] = args.smoke
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{'process':<16}{'first MB':>10}{'last MB':>10}{'ratio':>8}  flat (within {FLAT:.0%})")
    for name, m in result["rss"].items():
        first, last = (f"{v:.1f}" if v is not None else "-" for v in (m["first_window_mb"], m["last_window_mb"]))
        ratio = f"{m['ratio']:.3f}" if m["ratio"] is not None else "-"
        print(f"{name:<16}{first:>10}{last:>10}{ratio:>8}  {m['flat']}")
    f = result["frames"]
    print(f"frames: {f['produced']} produced; run: {f['published_run']} published + {f['lost_or_dropped_run']} "
          f"lost/dropped ({'all' if f['accounted_run'] else 'NOT all'} accounted); subscriber: {f['received']} "
          f"received + {f['dropped_end_of_stream']} dropped ({'all' if f['accounted_subscriber'] else 'NOT all'} "
          f"accounted); {len(result['kills'])} kills, exit {result['exit_code']}")
    print(f"journal: {f['published_journal']} frames published, {f['published_twice_journal']} twice "
          f"({'all' if f['accounted_journal'] else 'NOT all'} accounted with the drops); subscriber: "
          f"{f['received_twice']} received twice, {f['received_not_published']} not in the journal, "
          f"{f['missed_by_subscriber']} missed ({f['missed_after_publish_kill']} within {AFTER_PUBLISH_KILL_S:.0f} s "
          f"after a kill of publish)")
    load = result["machine"]
    print(f"load average {load['load_average_before'][0]:.2f} before, {load['load_average_after'][0]:.2f} after; "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
