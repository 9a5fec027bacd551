"""`maskstream node` and `maskstream fleet ...`: fleet mode on NATS JetStream (docs/fleet.md).

    maskstream node --nats nats://10.0.0.1:4222 --name gpu-a --capacity 8 --label site=lobby  # one per host
    maskstream fleet add door rtsp://10.0.0.7/stream --option rtsp_transport=udp --require site=lobby
    maskstream fleet status                # which node runs which camera, frames/s, drops, last error
    maskstream fleet submit /shared/archive/*.mp4
    maskstream fleet jobs
    maskstream subscribe nats://10.0.0.1:4222 --stream 'door' --from-seq 1

Part of the CLI, so it prints and chooses exit statuses: 0 done; 1 the fleet could not be
reached or refused; 2 a usage or config error. `node` runs until SIGTERM or Ctrl-C, then drains
(a second signal hands everything back at once) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from maskstream.configs import CONFIG_DIR
from maskstream.pipeline.cli import run as run_command
from maskstream.pipeline.cli.options import add_logging, add_progress, config_file, subcommand
from maskstream.pipeline.config import ConfigError, load_config

if TYPE_CHECKING:  # the handlers import these themselves: see cli/main.py
    from maskstream.pipeline.fleet.config import FleetConfig
    from maskstream.pipeline.fleet.connection import FleetClient
    from maskstream.pipeline.fleet.jobs import JobQueue, JobState
    from maskstream.pipeline.fleet.leases import CameraRegistry, CameraRow, NodeInfo

log = logging.getLogger("maskstream.node")
T = TypeVar("T")


NODE_EXAMPLES = """
  maskstream node --nats nats://10.0.0.1:4222 --name gpu-a --capacity 8 --metrics-port 9101
  maskstream node --name lobby-1 --label site=lobby --label gpu=yes
  maskstream node --fleet-config fleet.yaml --model maskrcnn_resnet50_fpn_coco --device cuda
"""
FLEET_EXAMPLES = """
  maskstream fleet add door rtsp://10.0.0.7/stream --option rtsp_transport=udp
  maskstream fleet add lobby-4k rtsp://10.1.0.9/4k --require site=lobby --require gpu=yes
  maskstream fleet add gate rtsp://10.2.0.3/gate --require 'site=lobby|yard'
  maskstream fleet status
  maskstream fleet submit /shared/archive/*.mp4
  maskstream fleet jobs --json
  maskstream fleet cancel street-1a2b3c4d
  maskstream fleet submit /shared/archive/*.mp4 --wait
"""


def add_parsers(subparsers: Any) -> None:
    """Add `node` and `fleet` to the CLI's subparsers."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--nats", action="append", default=[], metavar="URL",
                            help="a NATS server of the fleet, e.g. nats://127.0.0.1:4222 (repeatable; "
                                 "default: the fleet config's nats.urls)")
    connection.add_argument("--fleet-config", type=config_file, default=CONFIG_DIR / "fleet.yaml",
                            help="fleet YAML (FleetConfig: credentials, TLS, replicas, lease and job settings)")
    connection.add_argument("--fleet-set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a fleet config value, e.g. replicas=3")
    add_logging(connection)

    node = subcommand(subparsers, "node", "run this host's share of the fleet's cameras and jobs (until SIGTERM)",
                      NODE_EXAMPLES, parents=[connection])
    node.add_argument("--name", default=socket.gethostname(),
                      help="the node's name in the fleet: this host's name unless given")
    node.add_argument("--capacity", type=_positive_int, default=4,
                      help="pipelines at once, cameras and jobs together")
    node.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                      help="what this host offers, e.g. site=lobby or gpu=yes (repeatable): it runs only cameras "
                           "whose every --require it has; keys and values: 1 to 63 ASCII letters, digits, "
                           "'.', '_', '-', starting with a letter or digit")
    node.add_argument("--config", type=config_file, default=CONFIG_DIR / "pipeline.yaml",
                      help="pipeline YAML every camera and job starts from (RunConfig; its sources are ignored)")
    node.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a pipeline value")
    node.add_argument("--workers", type=int, help="preprocess and postprocess processes of each pipeline")
    run_command.add_model_selection(node)
    node.add_argument("--metrics-port", type=int, help="serve the node's Prometheus metrics on 127.0.0.1:PORT")
    node.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                      help="on SIGTERM, how long running jobs may take to finish before they are handed back")
    node.add_argument("--no-spare", action="store_true",
                      help="start no pipeline process ahead of need (saves an idle process; starts are slower)")
    node.add_argument("--standby", type=_non_negative_int, default=1, metavar="N",
                      help="keep up to N warm camera pipelines waiting, never more than the node's free room: "
                           "each camera failing over to this node takes one over instead of waiting "
                           "for a pipeline's start; each costs an idle pipeline and its copy of the model")
    node.add_argument("--no-standby", dest="standby", action="store_const", const=0,
                      help="the same as --standby 0: no warm camera pipeline")
    node.add_argument("--standby-ready-timeout", type=_positive_float, default=300.0, metavar="SECONDS",
                      help="a standby not ready (model loaded and warmed up) this long after its start is "
                           "stopped as hung and made again (well above a cold start on a busy CPU host or a "
                           "torch.compile on a GPU)")
    node.add_argument("--standby-retry", type=_non_negative_float, default=30.0, metavar="SECONDS",
                      help="how long after a standby died unused or was stopped as hung another one starts")
    node.add_argument("--hung-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                      help="a pipeline process (a camera's, a job's, a standby's) silent this long is taken for "
                           "hung and SIGKILLed: the camera starts again, the job is handed back, the standby "
                           "made again (far above a loaded host's pauses)")
    node.add_argument("--status-interval", type=float, default=1.0, metavar="SECONDS",
                      help="how often the cameras' frames/s, drops and errors are written for `fleet status`")
    node.set_defaults(func=run_node)

    fleet = subcommand(subparsers, "fleet",
                       "the fleet's cameras and jobs: add, remove, list, status, submit, jobs, wait, cancel",
                       FLEET_EXAMPLES)
    sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="<fleet command>",
                               help="what to do with the fleet (each has its own --help)")

    def leaf(name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
        return subcommand(sub, name, help_text, examples, parents=[connection])

    add = leaf("add", "add a live camera (nodes claim it within seconds)",
               "  maskstream fleet add door rtsp://10.0.0.7/stream --option rtsp_transport=udp")
    add.add_argument("name", help="the camera's name: also its results' stream id")
    add.add_argument("url", help="rtsp://, http(s):// URL, /dev/video* or a file every node can read")
    add.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="a `maskstream run` source.* setting for this camera, e.g. rtsp_transport=udp, "
                          "policy=offline (default live)")
    add.add_argument("--require", action="append", default=[], metavar="KEY=VALUE",
                     help="a node label this camera needs, e.g. site=lobby, or one of several: site=lobby|yard "
                          "(repeatable: all must match); only nodes started with such a --label run it, and it "
                          "waits while none is up")
    add.add_argument("--replace", action="store_true",
                     help="change an existing camera's URL, options and requirements (a node that no longer "
                          "satisfies them stops it, and one that does takes it)")
    add.set_defaults(func=fleet_add)
    remove = leaf("remove", "remove a camera (its node stops it)", "  maskstream fleet remove door")
    remove.add_argument("name", help="the camera's name, as `fleet list` shows it")
    remove.set_defaults(func=fleet_remove)
    listing = leaf("list", "the fleet's cameras", "  maskstream fleet list --json")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    listing.set_defaults(func=fleet_list)
    status = leaf("status", "which node runs which camera (frames/s, drops, last error), and the nodes",
                  "  maskstream fleet status --nats nats://10.0.0.1:4222")
    status.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    status.set_defaults(func=fleet_status)
    submit = leaf("submit", "queue offline jobs: one per file or URL",
                  "  maskstream fleet submit /shared/archive/*.mp4")
    submit.add_argument("inputs", nargs="+", metavar="FILE_OR_URL",
                        help="video files (on a path every node can read) or URLs")
    submit.add_argument("--no-check", action="store_true",
                        help="queue paths that do not exist here (they exist on the nodes); without it each file "
                             "is opened here first and one that is no video refused")
    submit.add_argument("--wait", action="store_true",
                        help="then follow the jobs until they end, as `fleet wait` does (exit 0 when all are done)")
    add_follow_options(submit)
    submit.set_defaults(func=fleet_submit)
    wait = leaf("wait", "follow jobs until they end: progress on stderr, exit 0 when every one is done",
                "  maskstream fleet wait street-1a2b3c4d yard-5e6f7a8b --timeout 3600")
    wait.add_argument("job_ids", nargs="+", metavar="JOB", help="job ids, as `fleet submit` and `fleet jobs` show them")
    add_follow_options(wait)
    wait.set_defaults(func=fleet_wait)
    jobs = leaf("jobs", "every job's state, node, attempt and progress", "  maskstream fleet jobs --json")
    jobs.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    jobs.set_defaults(func=fleet_jobs)
    cancel = leaf("cancel", "cancel jobs: a queued one never runs, a running one is stopped by its node",
                  "  maskstream fleet cancel street-1a2b3c4d --why 'wrong file'")
    cancel.add_argument("job_ids", nargs="+", metavar="JOB",
                        help="job ids, as `fleet submit` and `fleet jobs` show them")
    cancel.add_argument("--why", default="", help="said in the job's state and in its results' EndOfStream")
    cancel.set_defaults(func=fleet_cancel)


def add_follow_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                        help="with --wait / wait: stop waiting after this long, exit 1 (the jobs go on)")
    add_progress(parser)


# A node names its jobs in its presence record within a second or two of taking them; a
# record this much newer than a running job's state that does not name it: the node runs it no more.
GONE_AFTER_S = 5.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def fleet_config(args: argparse.Namespace) -> FleetConfig:
    from maskstream.pipeline.fleet.config import FleetConfig, server_urls_option

    sets = list(args.fleet_set)
    if args.nats:
        try:
            urls = server_urls_option(args.nats)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        sets.append("nats.urls=" + json.dumps(urls))
    return load_config(FleetConfig, args.fleet_config, sets)


def _connect(args: argparse.Namespace, name: str) -> FleetClient | None:
    from maskstream.pipeline.fleet.connection import FleetClient, FleetError

    try:
        return FleetClient.connect(fleet_config(args), name=name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------- node


def run_node(args: argparse.Namespace) -> int:
    from maskstream.pipeline.fleet.connection import FleetClient, FleetError
    from maskstream.pipeline.fleet.leases import describe_labels, parse_labels
    from maskstream.pipeline.fleet.node import Node, NodeSettings, check_socket_paths
    from maskstream.pipeline.run_config import remove_dead_runs
    from maskstream.pipeline.runtime.metrics import MetricsServer

    try:  # before the model is fetched: a typo is said in a second
        labels = parse_labels("--label", args.label)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        config = fleet_config(args)
        base = run_command.run_config(argparse.Namespace(**{**_run_defaults(), **vars(args), "metrics_port": None}))
        check_socket_paths(base, base.transport.endpoint_dir)
        run_command.check_device(base.model)
        chosen = run_command.load_model(base.model)  # fetched and checked once, not in every pipeline
        settings = NodeSettings(args.name, args.capacity, base, status_interval_s=args.status_interval,
                                drain_timeout_s=args.drain_timeout, endpoint_dir=base.transport.endpoint_dir,
                                spare=not args.no_spare, standby=args.standby,
                                standby_ready_timeout_s=args.standby_ready_timeout,
                                standby_retry_s=args.standby_retry, hung_timeout_s=args.hung_timeout,
                                log_level=args.log_level, model=chosen, labels=labels)
    except run_command.Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    leftovers = remove_dead_runs(base.transport.endpoint_dir)
    if leftovers:
        log.info("removed %s", leftovers.describe())
    try:
        client = FleetClient.connect(config, name=f"node-{args.name}")
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    node = Node(client, settings)
    server = None
    previous = {sig: signal.signal(sig, lambda signum, frame: node.drain()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.metrics_port is not None:
            server = MetricsServer(args.metrics_port, node.metrics_text).start()
            log.info("node %s: metrics at %s", args.name, server.url)
        log.info("node %s: in the fleet at %s, capacity %d%s", args.name, client.state().server, args.capacity,
                 f", labels {describe_labels(labels)}" if labels else "")
        node.run()
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.close()
        client.close()
    log.info("node %s: drained", args.name)
    return 0


def _run_defaults() -> dict[str, Any]:
    """`maskstream run`'s options at their defaults: what run_config reads beyond the node's own options."""
    parser = argparse.ArgumentParser()
    run_command.add_parsers(parser.add_subparsers())
    return vars(parser.parse_args(["run"]))


# ---------------------------------------------------------------------------- fleet


def fleet_add(args: argparse.Namespace) -> int:
    from maskstream.pipeline.config import loads_config
    from maskstream.pipeline.fleet.leases import check_requires, parse_labels
    from maskstream.pipeline.run_config import SourceOptions

    try:
        requires = parse_labels("--require", args.require, check_requires)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: --option {item}: expected KEY=VALUE", file=sys.stderr)
            return 2
        options[key.strip()] = value.strip()
    try:  # a typo fails here, not on every node
        loads_config(SourceOptions, "", [f"{k}={v}" for k, v in options.items()], source="--option")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    camera = _on_fleet(args, lambda client: _registry(client).add(args.name, args.url, options,
                                                                  replace=args.replace, requires=requires))
    if camera is None:
        return 1
    print(f"{'replaced' if args.replace else 'added'} camera {camera.name}: {camera.url}")
    return 0


def fleet_remove(args: argparse.Namespace) -> int:
    def remove(client: FleetClient) -> str:
        _registry(client).remove(args.name)
        return str(args.name)

    if _on_fleet(args, remove) is None:
        return 1
    print(f"removed camera {args.name}")
    return 0


def fleet_list(args: argparse.Namespace) -> int:
    from maskstream.pipeline.fleet.leases import describe_labels

    cameras = _on_fleet(args, lambda client: _registry(client).cameras())
    if cameras is None:
        return 1
    if args.json:
        print(json.dumps([{"name": c.name, "url": c.url, "options": c.options, "requires": c.requires}
                          for c in cameras], indent=1))
        return 0
    _table(["CAMERA", "URL", "OPTIONS", "REQUIRES"],
           [[c.name, c.url, " ".join(f"{k}={v}" for k, v in sorted(c.options.items())), describe_labels(c.requires)]
            for c in cameras])
    return 0


def fleet_status(args: argparse.Namespace) -> int:
    from maskstream.pipeline.fleet.leases import describe_labels, satisfies

    def read(client: FleetClient) -> tuple[list[CameraRow], list[NodeInfo]]:
        registry = _registry(client)
        return registry.status(), registry.nodes()

    got = _on_fleet(args, read)
    if got is None:
        return 1
    rows, nodes = got
    now = time.time()

    def waiting_for(row: CameraRow) -> str | None:
        """Why a free camera waits: for any node, or for one with its labels when no live node has them."""
        if row.lease is not None:
            return None
        requires = row.camera.requires
        if not requires or any(satisfies(n.labels, requires) for n in nodes):
            return "a node"
        return f"a node with {describe_labels(requires)}"

    cameras: list[dict[str, Any]] = [{
        "camera": row.camera.name, "url": row.camera.url, "requires": row.camera.requires,
        "node": row.lease.node if row.lease else None, "waiting_for": waiting_for(row),
        "since_s": round(now - row.lease.acquired_at, 1) if row.lease else None,
        "frames_per_s": row.lease.status.frames_per_s if row.lease else None,
        "frames": row.lease.status.frames if row.lease else None,
        "drops": row.lease.status.drops if row.lease else None,
        "last_error": row.lease.status.last_error if row.lease else None,
    } for row in rows]
    node_rows: list[dict[str, Any]] = [
        {"node": n.name, "cameras": n.held, "jobs": list(n.jobs), "capacity": n.capacity + len(n.jobs),
         "standby_ready": n.ready, "labels": n.labels, "up_s": round(now - n.started_at, 1), "host": n.host,
         "pid": n.pid} for n in nodes]
    if args.json:
        print(json.dumps({"cameras": cameras, "nodes": node_rows}, indent=1))
        return 0
    _table(["CAMERA", "NODE", "FRAMES/S", "FRAMES", "DROPS", "REQUIRES", "LAST ERROR"],
           [[c["camera"], c["node"] or f"(waiting for {c['waiting_for']})", _number(c["frames_per_s"]),
             _number(c["frames"]), _number(c["drops"]), describe_labels(c["requires"]), c["last_error"] or ""]
            for c in cameras])
    print()
    _table(["NODE", "CAMERAS", "JOBS", "CAPACITY", "STANDBY", "UP", "LABELS"],
           [[n["node"], str(n["cameras"]), str(len(n["jobs"])), str(n["capacity"]), str(n["standby_ready"]),
             f"{n['up_s']:.0f} s", describe_labels(n["labels"])] for n in node_rows])
    return 0


def fleet_submit(args: argparse.Namespace) -> int:
    from maskstream.pipeline.fleet.results import ensure_results_stream
    from maskstream.pipeline.media.sources import SourceSpec

    if not args.no_check:
        # a file that no node could run (missing, a folder, no video, a first frame that does not
        # decode) is said here in a second, as `maskstream run` says it, not by a node minutes later
        files = [source for source in args.inputs if "://" not in source]
        try:
            if files:
                run_command.probe_sources({str(i): SourceSpec(path, policy="offline") for i, path in enumerate(files)},
                                          option="job input")
        except run_command.Refused as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    def submit(client: FleetClient) -> list[str] | ValueError:
        queue = _queue(client)
        ensure_results_stream(client)
        try:
            return queue.submit(args.inputs, check_exists=not args.no_check)
        except ValueError as exc:  # an input no node could read: a usage error
            return exc

    ids = _on_fleet(args, submit)
    if ids is None:
        return 1
    if isinstance(ids, ValueError):
        print(f"error: {ids}", file=sys.stderr)
        return 2
    for job_id, source in zip(ids, args.inputs):
        print(f"{job_id}\t{source}", flush=True)
    return _follow(args, ids) if args.wait else 0


def fleet_wait(args: argparse.Namespace) -> int:
    return _follow(args, list(dict.fromkeys(args.job_ids)))


# How often `fleet wait` reads the jobs' states: a node writes a job's progress every
# jobs.status_interval_s (2 s by default).
FOLLOW_EVERY_S = 1.0


def _follow(args: argparse.Namespace, ids: list[str]) -> int:
    """Read the jobs' states until each has ended: a progress counter per job on stderr (frames
    stored of the input's count), a line per job on stdout at its end. 0 when every one is done;
    1 when one failed or was cancelled, or at --timeout; 130 on Ctrl-C (the jobs go on)."""
    from maskstream.pipeline.cli.progress import Progress
    from maskstream.pipeline.fleet.connection import FleetError
    from maskstream.pipeline.fleet.jobs import ENDED, JobNotFound

    client = _connect(args, "maskstream-fleet")
    if client is None:
        return 1
    progress = Progress(enabled=not args.quiet, every_s=args.progress_every)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    ended: dict[str, JobState] = {}
    unreadable = ""
    try:
        with client:
            queue = _queue(client)
            while True:
                for job_id in [j for j in ids if j not in ended]:
                    try:
                        state = queue.get(job_id)
                    except JobNotFound as exc:
                        progress.close()
                        print(f"error: {exc}", file=sys.stderr)
                        return 1
                    except FleetError as exc:  # an election, a server gone: asked again next round
                        unreadable = str(exc)
                        continue
                    if state.frames_total is not None or state.state in ENDED:
                        where = f" on {state.node}" if state.state == "running" else ""
                        progress.set(job_id, state.frames, state.frames_total, postfix=f"{state.state}{where}")
                    if state.state in ENDED:
                        ended[job_id] = state
                        print(f"{job_id}\t{state.state}\t{state.frames} frames\t{state.error}".rstrip(), flush=True)
                if len(ended) == len(ids):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    progress.close()
                    left = [j for j in ids if j not in ended]
                    print(f"error: {len(left)} of {len(ids)} jobs not ended within {args.timeout:g} s "
                          f"({', '.join(left[:5])}{', ...' if len(left) > 5 else ''}); they go on"
                          + (f"; last read error: {unreadable}" if unreadable else ""), file=sys.stderr)
                    return 1
                time.sleep(FOLLOW_EVERY_S)
    except KeyboardInterrupt:
        progress.close()
        print("stopped waiting; the jobs go on (`maskstream fleet jobs` shows them)", file=sys.stderr)
        return 130
    progress.close()
    return 0 if all(state.state == "done" for state in ended.values()) else 1


def fleet_jobs(args: argparse.Namespace) -> int:
    got = _on_fleet(args, lambda client: (_queue(client).jobs(), {n.name: n for n in _registry(client).nodes()}))
    if got is None:
        return 1
    states, nodes = got
    rows: list[dict[str, Any]] = []
    for s in states:
        # a running job's node that left the fleet (or runs it no more) will not finish it: another node
        # hands it back once its state has been silent for the lease TTL (or the server delivers it again
        # after ack_wait_s), unless that was its last allowed delivery
        node = nodes.get(s.node)
        gone = s.state == "running" and (node is None or (s.job_id not in node.jobs
                                                          and node.renewed_at > s.updated_at + GONE_AFTER_S))
        rows.append({"job": s.job_id, "state": s.state, "node": s.node, "node_gone": gone, "attempt": s.attempt,
                     "frames": s.frames, "frames_total": s.frames_total, "frames_per_s": s.frames_per_s,
                     "error": s.error, "input": s.input})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    _table(["JOB", "STATE", "NODE", "ATTEMPT", "PROGRESS", "ERROR", "INPUT"],
           [[r["job"], r["state"], f"{r['node']} (gone)" if r["node_gone"] else r["node"], str(r["attempt"]),
             _progress(r["state"], r["frames"], r["frames_total"], r["frames_per_s"]), r["error"], r["input"]]
            for r in rows])
    return 0


def fleet_cancel(args: argparse.Namespace) -> int:
    from maskstream.pipeline.fleet.jobs import JobNotFound

    def cancel(client: FleetClient) -> list[tuple[str, JobState | JobNotFound]]:
        queue = _queue(client)
        out: list[tuple[str, JobState | JobNotFound]] = []
        for job_id in args.job_ids:
            try:
                out.append((job_id, queue.cancel(job_id, args.why)))
            except JobNotFound as exc:  # the others are still cancelled
                out.append((job_id, exc))
        return out

    got = _on_fleet(args, cancel)
    if got is None:
        return 1
    status = 0
    for job_id, before in got:
        if isinstance(before, Exception):
            print(f"error: {before}", file=sys.stderr)
            status = 1
        elif before.state == "queued":
            print(f"cancelled job {job_id} (queued: it will not run)")
        elif before.state == "running":
            print(f"cancelled job {job_id} (running on {before.node}: it stops there within seconds)")
        else:
            print(f"job {job_id} had ended already ({before.state}): left as it was")
    return status


def _progress(state: str, frames: int, total: int | None, frames_per_s: float) -> str:
    """`312/795 39% 4.2/s` while running; what is known of it otherwise."""
    if state == "queued" and not frames:
        return ""
    done = f"{frames}/{total} {min(100, 100 * frames // max(total, 1))}%" if total else f"{frames}"
    return f"{done} {frames_per_s:.1f}/s" if state == "running" else done


def _on_fleet(args: argparse.Namespace, work: Callable[[FleetClient], T]) -> T | None:
    """work(client) on a connection of the command's own; None (the error printed) where the fleet
    could not be reached or refused the work. work never returns None."""
    from maskstream.pipeline.fleet.connection import FleetError

    client = _connect(args, "maskstream-fleet")
    if client is None:
        return None
    with client:
        try:
            return work(client)
        except FleetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return None


def _registry(client: FleetClient) -> CameraRegistry:
    from maskstream.pipeline.fleet.leases import CameraRegistry

    registry = CameraRegistry(client)
    registry.ensure()
    return registry


def _queue(client: FleetClient) -> JobQueue:
    from maskstream.pipeline.fleet.jobs import JobQueue

    queue = JobQueue(client)
    queue.ensure()
    return queue


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
