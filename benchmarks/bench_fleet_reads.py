"""Read-your-writes of `fleet add` then `fleet status`/`fleet list` on a 3-server cluster.

    python benchmarks/bench_fleet_reads.py [--trials 200] [--smoke] [--out PATH]

Each trial: an operator connected to one server adds a camera; the moment the add returns, a
reader connected to another server (each trial rotates both) reads `CameraRegistry.status()`
and `.cameras()`. A miss is a read that does not list the camera just added. The camera is
removed again after the reads (the bucket stays small). A read's watch is a consumer placed on
any of the bucket's servers, whose copy may not have the add yet: watch_behind counts the
snapshots of a bucket whose watch ended short of its last revision (the stream's leader filled
them in), the misses the reads that still lacked the camera. The NATS server is the
`nats-server` the project's setup installs, or MASKSTREAM_NATS_SERVER (as bench_fleet.py).
Prints the counts and writes fleet_reads.json (see --out).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_fleet import start_servers, stop  # benchmarks/, beside this script
from maskstream.pipeline.bench.measure import machine
from maskstream.pipeline.fleet.config import FleetConfig, NatsConfig
from maskstream.pipeline.fleet.connection import FleetClient, FleetError, wait_for
from maskstream.pipeline.fleet.leases import CameraRegistry
from options import add_output_options, parse_args, results_file  # benchmarks/options.py, beside this script


def config(urls: list[str]) -> FleetConfig:
    return FleetConfig(nats=NatsConfig(urls=tuple(urls), reconnect_wait_s=0.2, request_timeout_s=2.0), replicas=3)


def _ensured(registry: CameraRegistry) -> bool:
    try:  # a cluster just started may not place 3 replicas yet ("no suitable peers"): ask again
        registry.ensure()
    except FleetError:
        return False
    return True


class _Behind(logging.Handler):
    """Counts the reads whose watch ended short of the bucket's last revision (kv_snapshot's debug line)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "filled in from the leader" in record.getMessage()


def trials(urls: list[str], count: int) -> dict[str, Any]:
    clients = [FleetClient.connect(config([url]), name=f"client-{i}") for i, url in enumerate(urls)]
    behind = _Behind()
    logger = logging.getLogger("maskstream.pipeline.fleet.connection")
    logger.addHandler(behind)
    logger.setLevel(logging.DEBUG)
    try:
        registries = [CameraRegistry(client) for client in clients]
        wait_for(lambda: _ensured(registries[0]), 60, "the lease buckets made")
        missed_status = missed_list = 0
        reads: list[float] = []
        for i in range(count):
            writer, reader = registries[i % 3], registries[(i + 1 + (i // 3) % 2) % 3]
            name = f"cam{i}"
            writer.add(name, f"rtsp://127.0.0.1:8554/{name}")
            began = time.perf_counter()
            rows = reader.status()
            cameras = reader.cameras()
            reads.append(time.perf_counter() - began)
            missed_status += name not in {row.camera.name for row in rows}
            missed_list += name not in {camera.name for camera in cameras}
            writer.remove(name)
        return {"trials": count, "missed_status": missed_status, "missed_list": missed_list,
                "watch_behind": behind.count, "read_ms_median": round(1000 * statistics.median(reads), 2),
                "read_ms_max": round(1000 * max(reads), 2)}
    finally:
        logger.removeHandler(behind)
        for client in clients:
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="cameras added, each read at once")
    add_output_options(parser)
    args = parse_args(parser, {"trials": 3}, None)
    if args.trials < 1:
        parser.error("--trials: expected at least 1")
    out = results_file(parser, args, "fleet_reads.json")
    started = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-reads-") as tmp:
        procs, urls = start_servers(Path(tmp), 3)
        try:
            reads = trials(urls, args.trials)
        finally:
            stop(procs)
    result = {
        "what": "fleet add, then at once fleet status / fleet list through another server of 3: misses",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "smoke": args.smoke,
        "machine": {**machine(), "load_average_at_start": started, "load_average_at_end": os.getloadavg()},
        **reads,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{reads['trials']} adds, each read at once through another server: status missed the camera "
          f"{reads['missed_status']} times, list {reads['missed_list']} times ({reads['watch_behind']} reads' watches "
          f"ended short of the bucket's last revision); status + list took "
          f"{reads['read_ms_median']} ms median, {reads['read_ms_max']} ms max; wrote {out}")


if __name__ == "__main__":
    main()
