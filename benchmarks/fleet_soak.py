"""Fleet soak: cameras and jobs for many minutes under repeated faults. Does a node, its pipelines or
the NATS servers leak (memory, threads, file descriptors, subscriptions, consumers), and do the
results stay right?

    python benchmarks/fleet_soak.py [--duration-s 660] [--fault-every-s 60] [--cameras 2] [--rate 5]
        [--job-every-s 25] [--job-frames 20] [--cut-s 8] [--sample-s 2] [--set KEY=VALUE] [--logs DIR]
        [--out PATH] [--smoke]

The fleet: a 3-server cluster (tests/nats_cluster.py, replicas 3, servers started with
--no_advertise so that a client knows only the URLs it was given), two `maskstream node`
processes (bench_fleet.Node; the tiny model; capacity --cameras + 1, --standby 1), each reaching
every server only through TCP relays of its own (tests/net_fault.py), so that its link can be
pulled. --cameras live cameras (a generated clip played live at --rate frames/s, as soak.py makes
it) and a job (a --job-frames clip) submitted every --job-every-s until two fault intervals before
the end. The soak's clock starts once every camera's results flow and each node has a warm standby.

Faults, one every --fault-every-s, in turn: SIGKILL the pipeline process of one camera; SIGKILL a
node (started again at once); SIGKILL a NATS server (n0, n1, n2 in turn; started again with its
store after --server-down-s); pull a node's link (its relays blackholed for --cut-s, then healed:
the host off the network). Each node fault hits the node running the most cameras then. The last
fault comes at least two intervals before the end.

Sampled every --sample-s: each node process's RSS, open fds (/proc/PID/fd), threads
(/proc/PID/status) and CPU (`cpu_share`: the utime + stime of /proc/PID/stat that the node process
itself used since its last sample, as a share of one core; not its pipelines', which are processes
of their own), and apart from it its pipelines (every process below it: their count and summed
RSS); processes of the nodes' pipelines left behind (their process groups seen below a node, no
longer below one); the shared-memory rings of the nodes' pipelines in /dev/shm, and of those dead;
each node's NATS subscriptions (the servers' /connz, by the node's connection name); each server's
RSS and CPU (`servers_cpu_share`, the same way); the consumers of every stream (the results, the
job queue, each KV bucket: JetStream's stream info). Per metric, the median over the first window
(the first interval less its first quarter) against the last (the final interval less its first
quarter), its tolerance and a verdict (`flat`: the last at most the tolerance above the first; a
leak grows, and a process started again meanwhile may well be smaller). A node's fds and threads
follow what it runs, which the faults move: they are compared like with like (`leak_metrics`).
Metrics marked informative (`verdict` false) move with the cameras and jobs a node runs and say
nothing about a leak alone; so is each server's RSS, which settles over hours, not minutes
(bench_kv_churn.py measures it).

CPU (`cpu`): each node's and server's own CPU seconds over the seconds between its samples (a process
started again counted from its second sample), `mean_share` over the soak and `max_share` of one
sample; the first and last windows' medians are in `metrics` (`*_cpu_share`, informative).
`nodes_cpu_ok` (a verdict): each node's mean share at most NODE_CPU_SHARE_MAX, far above what a node
busy with the soak's cameras and jobs uses and far below the whole core a loop that never sleeps
takes (docs/fleet.md, "A long soak"). The servers' CPU is reported, not checked.

Correctness, from every message of the results stream read back at the end with its message id
(`<camera>:<epoch>:<seq>`, an epoch per run of a camera) and its stored time:
- jobs: each submitted job's results are each frame once, in order, then one EndOfStream with
  seq = the clip's frames and no error, and its state is `done`;
- cameras: within an epoch no seq twice, seqs rising; no two epochs of a camera overlap in time,
  by the pipeline's own publish stamps (CLOCK_MONOTONIC, one host): no camera's results came from
  two nodes at once (the node metrics sampled, each node listing the cameras it runs, are shown
  too, but two reads one after the other can catch a camera that moved between them);
- after each fault, each camera's longest gap between two stored results, up to the next fault,
  and the wait for the first result of a run begun after the fault.

--smoke: the tiny model, 90 s with a fault every 15 s (one of each kind), a job every 15 s.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the fleet tests' servers and relay: tests/nats_cluster.py, tests/net_fault.py

import av  # noqa: E402
import nats.errors  # noqa: E402
from bench_fleet import START_TIMEOUT_S, Node, nats_binary  # noqa: E402  (benchmarks/, beside this script)
from maskstream.pipeline.bench.measure import machine  # noqa: E402
from maskstream.pipeline.bench.smoke import tiny_run_overrides  # noqa: E402
from maskstream.pipeline.config import dump_config  # noqa: E402
from maskstream.pipeline.fleet.config import FleetConfig, NatsConfig  # noqa: E402
from maskstream.pipeline.fleet.connection import FleetClient, FleetError, wait_for  # noqa: E402
from maskstream.pipeline.fleet.jobs import JobQueue  # noqa: E402
from maskstream.pipeline.fleet.leases import CameraRegistry  # noqa: E402
from maskstream.pipeline.fleet.results import decode_result, stream_from_token  # noqa: E402
from maskstream.pipeline.media.video import write_test_clip  # noqa: E402
from maskstream.pipeline.runtime.messages import Detections, EndOfStream  # noqa: E402
from maskstream.pipeline.runtime.shm_ring import SHM_DIR  # noqa: E402
from nats.js import api  # noqa: E402
from options import add_output_options, parse_args, results_file  # noqa: E402
from soak import rss_mb, write_clip  # noqa: E402

FAULTS = ("pipeline", "node", "server", "link")
JOB_STEM = "job"  # the job clip's stem: its pipelines' decoder is decode.job
RSS_FLAT = 0.05  # a process's median RSS, last window against first
PIPELINES_RSS_FLAT = 0.10  # the pipelines' summed RSS: which runs are up moves it more
# A server's RSS is reported, not judged: it settles over far longer than a soak (the KV buckets'
# churn alone takes it from about 20 MB to 50-60 MB over the first hours: bench_kv_churn.py).
SERVER_RSS_FLAT = 0.10
COUNT_FLAT = 0.10  # fds, threads, processes: the last window's median at most this much (and 1) above the first's
# a node process's own CPU (its pipelines apart), mean over the soak, as a share of one core; see docs/fleet.md
NODE_CPU_SHARE_MAX = 0.15
CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
JOBS_END_TIMEOUT_S = 300.0  # after the soak, jobs still queued or running get this long to finish


# ---------------------------------------------------------------------------- /proc


def proc_table(groups: dict[int, int] | None = None) -> tuple[dict[int, int], dict[int, str]]:
    """{pid: parent pid} and {pid: comm} of every process now (and into `groups`, {pid: process group})."""
    parents, names = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            parents[int(entry)] = int(fields[1])
            names[int(entry)] = stat[stat.index("(") + 1:stat.rindex(")")]
            if groups is not None:
                groups[int(entry)] = int(fields[2])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return parents, names


def children(parents: dict[int, int], pid: int) -> list[int]:
    return [p for p, parent in parents.items() if parent == pid]


def descendants(parents: dict[int, int], pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(parents, todo.pop())
        found += kids
        todo += kids
    return found


def fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def threads(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def cpu_s(pid: int) -> float | None:
    """A process's own CPU time so far (utime + stime): not its children's, waited for or not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) * CLOCK_TICK_S
    except (OSError, ValueError, IndexError):
        return None


def camera_pipeline(parents: dict[int, int], names: dict[int, str], node: int) -> int | None:
    """A pipeline process of `node` that runs a camera: one with a decoder that is not a job's (a
    standby waiting has none; one that took a camera over has decode.standby)."""
    for pid in children(parents, node):
        if any(names.get(p, "").startswith("decode.") and names[p] != f"decode.{JOB_STEM}"
               for p in children(parents, pid)):
            return pid
    return None


# ---------------------------------------------------------------------------- NATS


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)


def subscriptions(cluster: Any, names: list[str]) -> dict[str, int] | None:
    """Each named client's subscriptions, summed over the running servers (/connz); None unanswered."""
    found = dict.fromkeys(names, 0)
    for server in cluster.servers:
        if not server.running:
            continue
        try:
            connz = get_json(f"http://127.0.0.1:{server.monitor_port}/connz?limit=1024&subs=1")
        except (OSError, ValueError):
            return None
        for conn in connz.get("connections", []):
            if conn.get("name") in found:
                found[conn["name"]] += int(conn.get("subscriptions", 0))
    return found


def streams(client: FleetClient) -> dict[str, tuple[int, int]] | None:
    """(consumers, bytes stored) per stream (the results, the job queue, KV_<bucket>), from JetStream's
    stream info; None unanswered."""
    async def infos() -> dict[str, tuple[int, int]]:
        return {info.config.name: (info.state.consumer_count, info.state.bytes)
                for info in await client.js.streams_info() if info.config.name is not None}
    try:
        return client.run(infos(), timeout_s=5)
    except (FleetError, TimeoutError):
        return None


def log_line(text: str) -> None:
    print(text, flush=True)


def read_results(client: FleetClient) -> list[dict[str, Any]]:
    """Every message of the results stream: its stream, message id, stored time (time.time()) and decoded result."""
    res = client.config.results

    async def read() -> list[Any]:
        js = client.js
        last = (await js.stream_info(res.stream)).state.last_seq
        got: list[Any] = []
        tries = 0
        while (got[-1].metadata.sequence.stream if got else 0) < last:
            start = got[-1].metadata.sequence.stream + 1 if got else 1
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
                                        ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0, num_replicas=1,
                                        mem_storage=True)
            try:
                psub = await js.pull_subscribe(f"{res.subject_prefix}.*", durable=None, stream=res.stream,
                                               config=config)
                try:
                    while (got[-1].metadata.sequence.stream if got else 0) < last:
                        got += [m for m in await psub.fetch(1024, timeout=10) if m.metadata.sequence.stream >= start]
                        start = got[-1].metadata.sequence.stream + 1 if got else start
                finally:
                    with contextlib.suppress(Exception):
                        await psub.unsubscribe()
            except (nats.errors.Error, asyncio.TimeoutError) as exc:  # a consumer's server busy or gone: again
                tries += 1
                if tries > 30:
                    raise
                log_line(f"reading the results again after {type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)
        return got

    out = []
    for msg in client.run(read(), timeout_s=300):
        stamp = msg.metadata.timestamp
        out.append({"stream": stream_from_token(msg.subject.rsplit(".", 1)[-1]),
                    "id": (msg.headers or {}).get("Nats-Msg-Id", ""),
                    "stored": stamp.timestamp() if isinstance(stamp, datetime) else float(stamp or 0),
                    "message": decode_result(msg.data)})
    return out


# ---------------------------------------------------------------------------- the soak


class Sampler(threading.Thread):
    """Every sample_s: the nodes' processes, the servers' RSS, subscriptions, consumers, cameras run."""

    def __init__(self, nodes: dict[str, Node], cluster: Any, monitor: FleetClient, sample_s: float) -> None:
        super().__init__(name="sampler", daemon=True)
        self.nodes, self.cluster, self.monitor, self.sample_s = nodes, cluster, monitor, sample_s
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.pipeline_groups: set[int] = set()  # every pipeline's process group seen below a node
        self._cpu_read: dict[str, tuple[int, float, float]] = {}  # per process sampled: (pid, monotonic, cpu_s)
        self.cpu_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # CPU s used, over wall s

    def cpu_share(self, key: str, pid: int) -> float | None:
        """The share of one core process `key` (now pid) used since its last sample; None at its first
        (a process started again meanwhile starts again)."""
        used, now = cpu_s(pid), time.monotonic()
        if used is None:
            return None
        last = self._cpu_read.get(key)
        self._cpu_read[key] = (pid, now, used)
        if last is None or last[0] != pid or now <= last[1]:
            return None
        totals = self.cpu_totals[key]
        totals[0] += used - last[2]
        totals[1] += now - last[1]
        return round((used - last[2]) / (now - last[1]), 4)

    def run(self) -> None:
        while not self.stop.wait(self.sample_s):
            self.samples.append(self.sample())

    def sample(self) -> dict[str, Any]:
        groups: dict[int, int] = {}
        parents, _ = proc_table(groups)
        sample: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2), "nodes": {}, "servers": {}, "runs": {}}
        under_nodes: set[int] = set()
        for name, node in list(self.nodes.items()):
            pid = node.proc.pid
            if node.proc.poll() is not None:
                continue
            below = descendants(parents, pid)
            under_nodes.update(below)
            # a pipeline process makes a group of its own (runs.pipeline_process), its stages in it
            self.pipeline_groups.update(groups[p] for p in below if p in groups and groups[p] != groups.get(pid))
            rss = [mb for p in below if (mb := rss_mb(p)) is not None]
            sample["nodes"][name] = {"rss_mb": rss_mb(pid), "fds": fds(pid), "threads": threads(pid),
                                     "pipelines": len(children(parents, pid)), "processes_below": len(below),
                                     "pipelines_rss_mb": round(sum(rss), 1),
                                     "cpu_share": self.cpu_share(f"node_{name}", pid)}
            sample["runs"][name] = running_cameras(node)
            sample["nodes"][name]["jobs"] = jobs_running(node)
        # a pipeline's process left behind: its node gone or its pipeline killed, it did not exit
        sample["stray_processes"] = sum(1 for p, group in groups.items()
                                        if group in self.pipeline_groups and p not in under_nodes)
        # the shared-memory rings of the nodes' pipelines (named maskstream-PIPELINE_PID-...), and of those dead
        rings: dict[bool, float] = {True: 0.0, False: 0.0}
        for path in SHM_DIR.glob("maskstream-*"):
            owner = re.match(r"maskstream-(\d+)-", path.name)
            if owner and int(owner.group(1)) in self.pipeline_groups:
                try:
                    rings[int(owner.group(1)) in groups] += path.stat().st_size / 2**20
                except OSError:
                    continue
        sample["rings_mb"], sample["dead_pipelines_rings_mb"] = round(rings[True], 1), round(rings[False], 1)
        sample["servers_cpu_share"] = {}
        for server in self.cluster.servers:
            if server.running:
                sample["servers"][server.name] = rss_mb(server.pid)
                sample["servers_cpu_share"][server.name] = self.cpu_share(f"server_{server.name}", server.pid)
        sample["subscriptions"] = subscriptions(self.cluster, [f"node-{name}" for name in self.nodes])
        info = streams(self.monitor)
        sample["consumers"] = None if info is None else {name: count for name, (count, _) in info.items()}
        sample["stored_mb"] = None if info is None else round(sum(size for _, size in info.values()) / 2**20, 2)
        return sample


def jobs_running(node: Node) -> int | None:
    jobs = node.metric("maskstream_node_jobs")
    return None if jobs != jobs else int(jobs)  # NaN: unanswered


def running_cameras(node: Node) -> list[str] | None:
    """The cameras the node runs now, by its metrics (a per-camera series each); None unanswered."""
    rates = camera_rates(node)
    return None if rates is None else sorted(rates)


def camera_rates(node: Node) -> dict[str, float] | None:
    """Each camera the node runs: its frames/s over the last seconds; None unanswered."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    return {name: float(value) for name, value in re.findall(
        r'^maskstream_node_stream_frames_per_second\{[^}]*stream="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


def in_background(what: str, action: Callable[[], None], errors: list[str]) -> threading.Thread:
    def run() -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001  (reported in the JSON: the soak goes on)
            errors.append(f"{what}: {type(exc).__name__}: {exc}")
    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    return thread


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    os.environ["MASKSTREAM_NATS_SERVER"] = nats_binary()  # what tests/nats_cluster.py starts
    from tests.nats_cluster import NatsCluster
    from tests.net_fault import Relay

    codec = "libx264" if "libx264" in av.codecs_available else None
    camera_clip = write_clip(work / "camera.mp4", int(args.rate * (args.duration_s + 120)), args.rate)
    job_clip = write_test_clip(work / f"{JOB_STEM}.mp4", frames=args.job_frames, size=(320, 240), fps=10, codec=codec)
    with av.open(str(job_clip)) as video:
        job_frames = sum(1 for _ in video.decode(video=0))
    cluster = NatsCluster(work / "cluster")
    for server in cluster.servers:
        server.extra = ("--no_advertise",)  # node b must know no way to a server but its relays
    cluster.start()
    direct = FleetConfig(nats=NatsConfig(urls=cluster.urls), replicas=3)
    relays: dict[str, list[Any]] = {}
    configs: dict[str, Path] = {}
    for name in ("a", "b"):  # each node reaches every server through a relay of its own, to be cut off alone
        relays[name] = [Relay(server.port) for server in cluster.servers]
        configs[name] = work / f"{name}.yaml"
        configs[name].write_text(dump_config(dataclasses.replace(
            direct, nats=dataclasses.replace(direct.nats, urls=tuple(relay.url for relay in relays[name])))))
    capacity = args.cameras + 1
    sets = [*tiny_run_overrides(), *args.set]
    extra = ("--standby", "1")
    names = [f"cam{i}" for i in range(args.cameras)]
    nodes: dict[str, Node] = {}
    errors: list[str] = []
    unanswered: list[str] = []  # job submissions the cluster did not answer (tried again)
    faults: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    background: list[threading.Thread] = []
    load_before = machine()
    started = time.monotonic()

    def start_node(name: str) -> None:
        nodes[name] = Node(name, configs[name], capacity, sets, work / f"node-{name}.log", *extra)

    monitor = FleetClient.connect(direct, name="soak-monitor")
    sampler: Sampler | None = None
    try:
        registry = CameraRegistry(monitor)
        registry.ensure()
        queue = JobQueue(monitor)
        for thread in [in_background(f"start node {name}", lambda name=name: start_node(name), errors)
                       for name in ("a", "b")]:
            thread.join()
        if errors:
            raise RuntimeError("; ".join(errors))
        for name in names:
            registry.add(name, str(camera_clip))
        wait_for(lambda: sorted(c for node in nodes.values() for c, fps in (camera_rates(node) or {}).items()
                                if fps > 0) == names, START_TIMEOUT_S, "every camera's results flowing", every=0.5)
        for node in nodes.values():  # as on a fleet running for a while: every node's standby warm
            wait_for(lambda node=node: node.metric("maskstream_node_standby_ready") >= 1, START_TIMEOUT_S,
                     f"a warm standby on {node.name}", every=0.5)
        setup_s = time.monotonic() - started
        print(f"fleet up in {setup_s:.1f} s: {len(names)} cameras held, standbys warm; soak of {args.duration_s:g} s",
              flush=True)
        sampler = Sampler(nodes, cluster, monitor, args.sample_s)
        sampler.start()
        t0 = sampler.t0
        t0_wall = time.time() - (time.monotonic() - t0)
        next_job = 0.0
        last_fault_at = args.duration_s - 2 * args.fault_every_s
        while (now := time.monotonic() - t0) < args.duration_s:
            if now >= next_job and now <= last_fault_at:
                try:
                    (job_id,) = queue.submit([str(job_clip)])
                    jobs.append({"id": job_id, "at_s": round(now, 1)})
                    next_job = now + args.job_every_s
                except FleetError as exc:  # the server just killed, an election: as an operator would, again
                    unanswered.append(f"submit at {now:.1f} s: {exc}")
            due = (len(faults) + 1) * args.fault_every_s
            if now >= due and due <= last_fault_at:
                fault = inject(FAULTS[len(faults) % len(FAULTS)], len(faults), nodes, cluster, relays, args,
                               start_node, errors, background)
                if fault is not None:
                    fault["at_s"] = round(time.monotonic() - t0, 1)
                    faults.append(fault)
                    print(f"{fault['at_s']:7.1f} s: {fault['kind']} fault: {fault['target']}", flush=True)
            time.sleep(0.2)
        soaked = time.monotonic() - t0
        sampler.stop.set()
        sampler.join(30)
        for thread in background:
            thread.join(START_TIMEOUT_S)
        ids = {job["id"] for job in jobs}
        try:
            wait_for(lambda: all(s.state in ("done", "failed") for s in queue.jobs() if s.job_id in ids),
                     JOBS_END_TIMEOUT_S, "every job finished", every=1.0)
        except TimeoutError as exc:
            errors.append(str(exc))
        states = {s.job_id: s for s in queue.jobs() if s.job_id in ids}
        node_counters = {name: {key: node.metric(f"maskstream_{key}") for key in (
            "nats_reconnects_total", "node_leases_acquired_total", "node_leases_lost_total",
            "node_camera_restarts_total", "node_standby_takeovers_total", "node_jobs_done_total",
            "node_job_redeliveries_total")} for name, node in nodes.items()}
        stop_nodes(nodes)
        try:
            stored = read_results(monitor)
        except FleetError as exc:  # the figures are kept; correctness then fails, saying why
            errors.append(f"reading the results back: {exc}")
            stored = []
    finally:
        if sampler is not None:
            sampler.stop.set()
        stop_nodes(nodes)
        monitor.close()
        for relay in (relay for node_relays in relays.values() for relay in node_relays):
            relay.close()
        cluster.stop()
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in [*work.glob("node-*.log"), *(work / "cluster").glob("*.log")]:
                shutil.copy(log, args.logs / log.name)
    samples = sampler.samples
    windows = {"first": (args.fault_every_s / 4, args.fault_every_s),
               "last": (args.duration_s - args.fault_every_s * 3 / 4, args.duration_s)}
    metrics = leak_metrics(samples, windows, names=sorted(nodes))
    cpu = cpu_use(samples, sampler.cpu_totals, sorted(nodes))
    correctness = check_results(stored, names, jobs, states, job_frames, faults, samples, t0_wall)
    return {
        "what": "fleet soak: a 3-server cluster, 2 nodes, live cameras and a job stream under repeated faults; "
                "per metric, the first window against the last; every result checked",
        "command": shlex.join(sys.argv),
        "machine": {**load_before, "load_average_before": load_before["load_average"],
                    "load_average_after": os.getloadavg()},
        "model": "tiny" if not args.set else "tiny with " + ", ".join(args.set),
        "settings": {"duration_s": args.duration_s, "fault_every_s": args.fault_every_s, "cameras": args.cameras,
                     "rate_fps": args.rate, "capacity": capacity, "standby": 1, "job_every_s": args.job_every_s,
                     "job_frames": job_frames, "cut_s": args.cut_s, "server_down_s": args.server_down_s,
                     "sample_s": args.sample_s, "servers": len(cluster.servers), "replicas": 3},
        "setup_s": round(setup_s, 1), "soaked_s": round(soaked, 1), "elapsed_s": round(time.monotonic() - started, 1),
        "faults": faults, "errors": errors, "submits_unanswered": unanswered,
        "windows_s": {w: [round(a, 1), round(b, 1)] for w, (a, b) in windows.items()},
        "metrics": metrics,
        # a metric with nothing to compare (flat None) is not counted either way; `metrics` shows it
        "leak_free": all(m["flat"] is not False for m in metrics.values() if m["verdict"]),
        "correctness": correctness,
        "correct": correctness["correct"],
        "cpu": cpu,
        "nodes_cpu_ok": cpu["nodes_within_bound"],
        "node_counters": node_counters,
        "samples": samples[::max(1, round(10 / args.sample_s))],  # one every ~10 s, for plots
    }


def inject(kind: str, index: int, nodes: dict[str, Node], cluster: Any, relays: dict[str, list[Any]],
           args: argparse.Namespace, start_node: Callable[[str], None], errors: list[str],
           background: list[threading.Thread]) -> dict[str, Any] | None:
    """One fault, its recovery left to a thread; None when it cannot be made now (tried again at the next tick).
    A node's fault hits the node running the most cameras (node a on a tie)."""
    wall = time.time()
    alive = {name: node for name, node in nodes.items() if node.proc.poll() is None}
    if len(alive) < len(nodes):
        return None  # one is still being started again
    runs = {name: running_cameras(node) or [] for name, node in alive.items()}
    holder = max(sorted(runs), key=lambda name: len(runs[name]))
    if kind == "node":
        node = nodes[holder]
        node.proc.kill()
        node.proc.wait()
        background.append(in_background(f"restart node {holder}", lambda: start_node(holder), errors))
        return {"kind": kind, "target": f"node {holder} (pid {node.proc.pid}, cameras {runs[holder]})", "wall": wall}
    if kind == "server":
        server = cluster.servers[index // len(FAULTS) % len(cluster.servers)]  # n0, n1, n2 in turn
        server.kill()

        def restart() -> None:
            time.sleep(args.server_down_s)
            server.start()
            cluster.wait_healthy()
        background.append(in_background(f"restart {server.name}", restart, errors))
        return {"kind": kind, "target": f"server {server.name}", "wall": wall}
    if kind == "link":
        for relay in relays[holder]:
            relay.blackhole()

        def heal() -> None:
            time.sleep(args.cut_s)
            for relay in relays[holder]:
                relay.heal()
        background.append(in_background(f"heal node {holder}'s link", heal, errors))
        return {"kind": kind, "target": f"node {holder}'s link, {args.cut_s:g} s (cameras {runs[holder]})",
                "wall": wall}
    parents, names = proc_table()
    pid = camera_pipeline(parents, names, nodes[holder].proc.pid)
    if pid is None:
        return None
    os.kill(pid, signal.SIGKILL)
    return {"kind": kind, "target": f"a camera pipeline on node {holder} (pid {pid}, cameras {runs[holder]})",
            "wall": wall}


def stop_nodes(nodes: dict[str, Node]) -> None:
    for node in nodes.values():
        if node.proc.poll() is None:
            node.proc.terminate()
    for node in nodes.values():
        try:
            node.proc.wait(90)
        except Exception:  # noqa: BLE001  (subprocess.TimeoutExpired: it did not drain)
            node.proc.kill()
            node.proc.wait()


# ---------------------------------------------------------------------------- analysis


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def composition(sample: dict[str, Any], node: str) -> tuple[int, int, int]:
    """What a node ran at a sample: pipeline processes (running, standby, spare, stopping), cameras, jobs."""
    runs = sample["runs"].get(node)
    return sample["nodes"][node]["pipelines"], -1 if runs is None else len(runs), sample["nodes"][node].get("jobs") or 0


def leak_metrics(samples: list[dict[str, Any]], windows: dict[str, tuple[float, float]],
                 names: list[str]) -> dict[str, dict[str, Any]]:
    """Per metric: the first and last windows' medians, the tolerance and the verdict. A node's fds and
    threads follow the pipelines it runs, which the faults move: they are compared like with like, over
    the samples of each window in which the node ran the same (`composition`: pipeline processes,
    cameras, jobs; the one most samples of the two windows share, `matched`)."""
    series: dict[str, tuple[Callable[[dict[str, Any]], float | None], str, float, bool, str | None]] = {}

    def node_value(name: str, key: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda s: s["nodes"].get(name, {}).get(key)

    def nodes_sum(key: str) -> Callable[[dict[str, Any]], float | None]:
        def value(s: dict[str, Any]) -> float | None:
            got = [s["nodes"].get(name, {}).get(key) for name in names]
            return None if any(v is None for v in got) else float(sum(got))
        return value

    for name in names:
        series[f"node_{name}_rss_mb"] = (node_value(name, "rss_mb"), "ratio", RSS_FLAT, True, None)
        for key in ("fds", "threads"):
            series[f"node_{name}_{key}"] = (node_value(name, key), "count", COUNT_FLAT, True, name)
        series[f"node_{name}_processes_below"] = (node_value(name, "processes_below"), "count", COUNT_FLAT, False,
                                                  None)
        series[f"node_{name}_pipelines_rss_mb"] = (node_value(name, "pipelines_rss_mb"), "ratio", PIPELINES_RSS_FLAT,
                                                   False, None)
        series[f"node_{name}_cpu_share"] = (node_value(name, "cpu_share"), "ratio", 0.0, False, None)
        series[f"node_{name}_nats_subscriptions"] = (
            lambda s, n=name: None if s["subscriptions"] is None else s["subscriptions"].get(f"node-{n}"),
            "count", 0.0, True, None)
    for key in ("fds", "threads", "processes_below"):
        series[f"nodes_{key}"] = (nodes_sum(key), "count", COUNT_FLAT, False, None)
    series["nodes_pipelines_rss_mb"] = (nodes_sum("pipelines_rss_mb"), "ratio", PIPELINES_RSS_FLAT, False, None)
    series["stray_processes"] = (lambda s: s["stray_processes"], "count", 0.0, True, None)
    series["rings_mb"] = (lambda s: s["rings_mb"], "ratio", PIPELINES_RSS_FLAT, False, None)
    series["dead_pipelines_rings_mb"] = (lambda s: s["dead_pipelines_rings_mb"], "count", 0.0, True, None)
    for server in sorted({name for s in samples for name in s["servers"]}):
        series[f"server_{server}_rss_mb"] = (lambda s, n=server: s["servers"].get(n), "ratio", SERVER_RSS_FLAT,
                                             False, None)
        series[f"server_{server}_cpu_share"] = (lambda s, n=server: s["servers_cpu_share"].get(n), "ratio", 0.0,
                                                False, None)
    series["results_and_state_stored_mb"] = (lambda s: s["stored_mb"], "ratio", 0.0, False, None)
    for stream in sorted({name for s in samples if s["consumers"] for name in s["consumers"]}):
        series[f"consumers_{stream}"] = (lambda s, n=stream: None if s["consumers"] is None else
                                         s["consumers"].get(n), "count", 0.0, True, None)
    out = {}
    for metric, (value, kind, tolerance, verdict, by_node) in series.items():
        inside = {w: [s for s in samples if lo <= s["t"] < hi] for w, (lo, hi) in windows.items()}
        matched = None
        if by_node is not None:
            counts = {w: [composition(s, by_node) for s in got if by_node in s["nodes"]] for w, got in inside.items()}
            shared = set(counts["first"]) & set(counts["last"])
            if shared:
                matched = max(sorted(shared), key=lambda k: counts["first"].count(k) + counts["last"].count(k))
            inside = {w: [s for s in got if by_node in s["nodes"] and composition(s, by_node) == matched]
                      for w, got in inside.items()}
        first, last = (_median([v for s in inside[w] if (v := value(s)) is not None]) for w in ("first", "last"))
        if first is None or last is None:
            flat = None  # nothing to compare (a node down all through a window, no like with like)
        elif kind == "ratio":  # a leak grows; a process started again meanwhile may well be smaller
            flat = first > 0 and last / first - 1 <= tolerance
        else:  # a count: at most the tolerance (and at least 1 where it is not 0) above the first window
            flat = last <= first + (max(1.0, tolerance * first) if tolerance else 0.0)
        out[metric] = {"first": first, "last": last, "kind": kind, "tolerance": tolerance, "verdict": verdict,
                       "flat": flat, **({"matched": matched} if by_node is not None else {})}
    return out


def cpu_use(samples: list[dict[str, Any]], totals: dict[str, list[float]], nodes: list[str]) -> dict[str, Any]:
    """Each node's and server's own CPU (the process itself: a node's pipelines are processes of their
    own) as a share of one core: over the soak (the CPU seconds it used between its samples over the
    seconds between them, a process started again counted from its second sample) and the highest
    sample's; a node's against NODE_CPU_SHARE_MAX."""
    shares: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        for name, node in sample["nodes"].items():
            if node.get("cpu_share") is not None:
                shares[f"node_{name}"].append(node["cpu_share"])
        for name, share in sample["servers_cpu_share"].items():
            if share is not None:
                shares[f"server_{name}"].append(share)
    processes: dict[str, dict[str, Any]] = {}
    for key, (used, wall) in sorted(totals.items()):
        mean = used / wall if wall > 0 else None
        row: dict[str, Any] = {"cpu_s": round(used, 2), "over_s": round(wall, 1),
                               "mean_share": None if mean is None else round(mean, 4),
                               "max_share": max(shares[key], default=None)}
        if key.startswith("node_"):
            row["within_bound"] = mean is not None and mean <= NODE_CPU_SHARE_MAX
        processes[key] = row
    checked = [processes.get(f"node_{name}", {}).get("within_bound", False) for name in nodes]
    return {"what": "each process's own CPU time (utime + stime, /proc/PID/stat), not its children's: a node's "
                    "pipelines are not in its figures", "node_mean_share_max": NODE_CPU_SHARE_MAX,
            "processes": processes, "nodes_within_bound": bool(checked) and all(checked)}


def epoch_of(item: dict[str, Any]) -> str:
    """The epoch in a camera result's message id (`<token>:<epoch>:<seq>`)."""
    parts = item["id"].split(":")
    return parts[1] if len(parts) == 3 else ""


def check_results(stored: list[dict[str, Any]], cameras: list[str], jobs: list[dict[str, Any]], states: dict[str, Any],
                  job_frames: int, faults: list[dict[str, Any]], samples: list[dict[str, Any]], t0: float
                  ) -> dict[str, Any]:
    """t0: time.time() when the soak's clock started (the runs' times are given from it)."""
    by_stream: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in stored:
        by_stream[item["stream"]].append(item)
    # jobs: each frame once, in order, one EndOfStream with the clip's count and no error; state done
    bad_jobs = {}
    for job in jobs:
        got = [item["message"] for item in by_stream.get(job["id"], [])]
        seqs = [m.header.seq for m in got if isinstance(m, Detections)]
        ends = [m for m in got if isinstance(m, EndOfStream)]
        state = states.get(job["id"])
        problems = []
        if seqs != list(range(job_frames)):
            problems.append(f"seqs {seqs[:5]}...{seqs[-5:]} ({len(seqs)}), expected 0..{job_frames - 1}")
        if len(ends) != 1 or not got or not isinstance(got[-1], EndOfStream):
            problems.append(f"{len(ends)} EndOfStream(s), last message {type(got[-1]).__name__ if got else None}")
        elif ends[0].header.seq != job_frames or ends[0].error:
            problems.append(f"EndOfStream seq {ends[0].header.seq}, error {ends[0].error!r}")
        if state is None or state.state != "done":
            problems.append(f"state {None if state is None else state.state}")
        if problems:
            bad_jobs[job["id"]] = problems
    attempts = [states[j["id"]].attempt for j in jobs if j["id"] in states]
    # cameras: per epoch (the message id's middle), seqs rising, none twice; epochs apart in time
    camera_rows = {}
    for camera in cameras:
        epochs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for item in by_stream.get(camera, []):
            epochs[epoch_of(item)].append(item)
        duplicates = out_of_order = 0
        spans = []
        timeline = []
        for epoch, items in epochs.items():
            timeline.append({"epoch": epoch, "results": len(items), "first_stored_s": round(items[0]["stored"] - t0, 2),
                             "last_stored_s": round(items[-1]["stored"] - t0, 2)})
            seqs = [item["message"].header.seq for item in items]
            duplicates += len(seqs) - len(set(seqs))
            out_of_order += sum(1 for x, y in zip(seqs, seqs[1:]) if y <= x)
            stamps = [max(s.end for s in item["message"].header.stamps if s.stage.startswith("publish"))
                      for item in items if isinstance(item["message"], Detections)]
            if stamps:
                spans.append((min(stamps), max(stamps)))
        spans.sort()
        gaps = [later[0] - earlier[1] for earlier, later in zip(spans, spans[1:])]
        camera_rows[camera] = {"results": len(by_stream.get(camera, [])), "epochs": len(epochs),
                               "duplicate_seqs_in_an_epoch": duplicates, "seqs_not_rising_in_an_epoch": out_of_order,
                               "epochs_overlapping": sum(1 for gap in gaps if gap < 0),
                               "min_gap_between_epochs_s": round(min(gaps), 3) if gaps else None,
                               "runs": timeline}
    both = [(s["t"], camera) for s in samples for camera in cameras
            if sum(1 for runs in s["runs"].values() if runs and camera in runs) > 1]
    # after each fault, each camera's longest wait between two stored results (the outage a reader sees),
    # up to the next fault, and the wait for the first result of a run (epoch) begun after the fault
    after = []
    ends = [f["wall"] for f in faults[1:]] + [max((i["stored"] for i in stored), default=0.0)]
    for fault, end in zip(faults, ends):
        row: dict[str, Any] = {"at_s": fault["at_s"], "kind": fault["kind"], "target": fault["target"],
                               "longest_gap_s": {}, "first_result_of_a_new_run_s": {}}
        for camera in cameras:
            items = by_stream.get(camera, [])
            before = [i for i in items if i["stored"] < fault["wall"]]
            within = [i for i in items if fault["wall"] <= i["stored"] < end]
            points = [before[-1]["stored"] if before else fault["wall"], *(i["stored"] for i in within), end]
            row["longest_gap_s"][camera] = round(max(y - x for x, y in zip(points, points[1:])), 2)
            old = {epoch_of(i) for i in before}
            new = [i["stored"] for i in within if epoch_of(i) not in old]
            row["first_result_of_a_new_run_s"][camera] = round(new[0] - fault["wall"], 2) if new else None
        after.append(row)
    # the samples' view is not in the verdict: the two nodes' metrics are read one after the other, and a
    # camera that moved between the two reads would show on both; the epochs' stamps are exact
    correct = (not bad_jobs and len(states) == len(jobs) > 0
               and all(r["duplicate_seqs_in_an_epoch"] == 0 and r["seqs_not_rising_in_an_epoch"] == 0
                       and r["epochs_overlapping"] == 0 and r["results"] > 0 for r in camera_rows.values()))
    return {
        "jobs": {"submitted": len(jobs), "done_exactly_once": len(jobs) - len(bad_jobs), "bad": bad_jobs,
                 "attempts_max": max(attempts, default=0), "redelivered": sum(1 for a in attempts if a > 1)},
        "cameras": camera_rows,
        "never_two_holders": all(r["epochs_overlapping"] == 0 for r in camera_rows.values()),
        "samples_with_a_camera_on_both_nodes": both[:20],
        "after_faults": after,
        "results_stored": len(stored),
        "correct": correct,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=660.0, help="the soak, from the fleet being up")
    parser.add_argument("--fault-every-s", type=float, default=60.0)
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--rate", type=float, default=5.0, help="frames/s each camera plays at")
    parser.add_argument("--job-every-s", type=float, default=25.0)
    parser.add_argument("--job-frames", type=int, default=20)
    parser.add_argument("--cut-s", type=float, default=8.0, help="how long node b's link stays pulled")
    parser.add_argument("--server-down-s", type=float, default=5.0, help="a killed server's time down")
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline setting")
    parser.add_argument("--logs", type=Path, metavar="DIR", help="copy the nodes' and servers' logs here")
    add_output_options(parser)
    args = parse_args(parser, {"duration_s": 90.0, "fault_every_s": 15.0, "job_every_s": 15.0, "job_frames": 10}, argv)
    if args.duration_s < 3 * args.fault_every_s:
        parser.error("--duration-s: expected at least 3 fault intervals (the first, one fault, the last)")
    out = results_file(parser, args, "fleet_soak.json")
    with tempfile.TemporaryDirectory(prefix="maskstream-fleet-soak-") as folder:
        result = soak(args, Path(folder))
    result["smoke"] = args.smoke
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{'metric':<40}{'first':>10}{'last':>10}  flat (verdict)")
    for name, m in result["metrics"].items():
        digits = 3 if name.endswith("_cpu_share") else 1
        first, last = (f"{v:.{digits}f}" if v is not None else "-" for v in (m["first"], m["last"]))
        print(f"{name:<40}{first:>10}{last:>10}  {m['flat']}{'' if m['verdict'] else ' (informative)'}")
    cpu = result["cpu"]
    print(f"own CPU, a share of one core ({cpu['what']}): mean over the soak, highest sample")
    for key, row in cpu["processes"].items():
        bound = "" if "within_bound" not in row else \
            f"  (bound {cpu['node_mean_share_max']:.2f}: {'within' if row['within_bound'] else 'EXCEEDED'})"
        mean, top = (f"{v:.3f}" if v is not None else "-" for v in (row["mean_share"], row["max_share"]))
        print(f"{key:<40}{mean:>10}{top:>10}{bound}")
    c = result["correctness"]
    print(f"jobs: {c['jobs']['done_exactly_once']} of {c['jobs']['submitted']} done exactly once "
          f"({c['jobs']['redelivered']} redelivered); cameras: " + "; ".join(
              f"{name} {row['results']} results in {row['epochs']} epochs, {row['duplicate_seqs_in_an_epoch']} "
              f"duplicate seqs, {row['epochs_overlapping']} epochs overlapping" for name, row in c["cameras"].items()))
    for row in c["after_faults"]:
        firsts = row["first_result_of_a_new_run_s"]
        print(f"{row['at_s']:7.1f} s {row['kind']:<9} longest gap " + ", ".join(
            f"{cam} {gap:.1f} s" + (f" (new run {firsts[cam]:.1f} s after)" if firsts[cam] is not None else "")
            for cam, gap in row["longest_gap_s"].items()))
    load = result["machine"]
    print(f"{len(result['faults'])} faults; leak-free: {result['leak_free']}; correct: {result['correct']}; "
          f"nodes' CPU within bound: {result['nodes_cpu_ok']}; errors: {result['errors'] or 'none'}")
    print(f"load average {load['load_average_before'][0]:.2f} before, {load['load_average_after'][0]:.2f} after; "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
