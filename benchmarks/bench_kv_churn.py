"""The NATS servers' memory under the fleet's control plane alone: do presence writes and lease
renewals, which rewrite a few keys every second for as long as a fleet runs, make the servers grow
without end?

    python benchmarks/bench_kv_churn.py [--minutes 20] [--speedup 5] [--nodes 2] [--cameras 6]
                                        [--sample-s 15] [--out PATH] [--smoke]

A 3-server cluster (tests/nats_cluster.py, replicas 3) and --nodes lease managers (in this
process, each on its own connection, as `maskstream node` runs one) holding --cameras cameras
between them, each camera's status reported every sample. The lease settings are the defaults
with every interval divided by --speedup (renewals, presence, TTL), so a run of M minutes writes
what a fleet of that size writes in M x speedup minutes; no pipeline runs, no result is published:
what grows here grows with the KV buckets' churn alone. Each server's RSS is sampled every
--sample-s. Reported: the samples, and the median of each third of the run; the servers plateau
(`plateau`: true) when the last third's median is at most 10% above the middle third's. The fleet
soak (fleet_soak.py) saw its servers' RSS double in 11 minutes with results stored besides; this
separates the control plane's share and shows whether it levels off.

--smoke: half a minute, a sample every 2.5 s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the fleet tests' servers: tests/nats_cluster.py

from maskstream.pipeline.bench.measure import machine  # noqa: E402
from maskstream.pipeline.fleet.config import FleetConfig, LeaseConfig, NatsConfig  # noqa: E402
from maskstream.pipeline.fleet.connection import FleetClient  # noqa: E402
from maskstream.pipeline.fleet.leases import CameraRegistry, CameraStatus, LeaseManager  # noqa: E402
from options import add_output_options, parse_args, results_file  # noqa: E402
from soak import rss_mb  # noqa: E402

from tests.nats_cluster import NatsCluster  # noqa: E402

PLATEAU_TOLERANCE = 0.10


def servers_rss_mb(cluster: NatsCluster) -> dict[str, float]:
    out = {}
    for server in cluster.servers:
        rss = rss_mb(server.pid)
        if rss is None:
            raise RuntimeError(f"NATS server {server.name} (pid {server.pid}) is gone")
        out[server.name] = round(rss, 2)
    return out


def churn(minutes: float, speedup: float, nodes: int, cameras: int, sample_s: float, root: Path) -> dict[str, Any]:
    default = LeaseConfig()
    leases = dataclasses.replace(default, ttl_s=default.ttl_s / speedup,
                                 renew_interval_s=default.renew_interval_s / speedup,
                                 claim_grace_s=default.claim_grace_s / speedup)
    cluster = NatsCluster(root)
    cluster.start()
    config = FleetConfig(nats=NatsConfig(urls=cluster.urls), replicas=3, leases=leases)
    managers: list[LeaseManager] = []
    samples: list[dict[str, float]] = []
    try:
        with FleetClient.connect(config, name="bench-admin") as admin:
            registry = CameraRegistry(admin)
            registry.ensure()
            for i in range(cameras):
                registry.add(f"cam{i}", f"rtsp://127.0.0.1:8554/cam{i}")
            capacity = -(-cameras // nodes)  # every camera held
            for i in range(nodes):
                manager = LeaseManager(FleetClient.connect(config, name=f"bench-node-{i}"), f"node-{i}", capacity)
                manager.start()
                managers.append(manager)
            began = time.monotonic()
            while True:
                elapsed = time.monotonic() - began
                for manager in managers:  # a status that changes, as a running camera's does
                    for camera in manager.held():
                        manager.report(camera, CameraStatus(frames_per_s=10.0 + elapsed % 1, frames=int(elapsed * 10)))
                samples.append({"t_s": round(elapsed, 1), **servers_rss_mb(cluster)})
                print(json.dumps(samples[-1]), flush=True)
                if elapsed >= minutes * 60:
                    break
                time.sleep(sample_s)
            held = sum(len(manager.held()) for manager in managers)
    finally:
        for manager in managers:
            manager.stop()
            manager.client.close()
        cluster.stop()
    thirds = {}
    for server in cluster.servers:
        values = [sample[server.name] for sample in samples]
        n = len(values) // 3
        thirds[server.name] = [statistics.median(part) for part in (values[:n], values[n:2 * n], values[2 * n:])]
    return {"samples": samples, "rss_mb_median_by_third": thirds, "cameras_held_at_end": held,
            "plateau": all(last <= middle * (1 + PLATEAU_TOLERANCE) for _, middle, last in thirds.values()),
            "lease_settings": dataclasses.asdict(leases)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--speedup", type=float, default=5.0, help="every lease interval divided by this")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--sample-s", type=float, default=15.0)
    add_output_options(parser)
    args = parse_args(parser, {"minutes": 0.5, "sample_s": 2.5}, None)
    if args.minutes <= 0 or args.speedup < 1 or args.nodes < 1 or args.cameras < 1 or args.sample_s <= 0:
        parser.error("expected --minutes > 0, --speedup >= 1, --nodes and --cameras >= 1, --sample-s > 0")
    out = results_file(parser, args, "kv_churn.json")
    started = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-kv-churn-") as tmp:
        measured = churn(args.minutes, args.speedup, args.nodes, args.cameras, args.sample_s, Path(tmp))
    result = {
        "what": "the NATS servers' RSS under the fleet's control-plane writes alone (presence, lease renewals, "
                f"status), {args.nodes} nodes and {args.cameras} cameras at {args.speedup:g}x the default rates",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "smoke": args.smoke,
        "minutes": args.minutes, "speedup": args.speedup, "fleet_minutes_equivalent": args.minutes * args.speedup,
        "machine": {**machine(), "load_average_at_start": started, "load_average_at_end": os.getloadavg()},
        **measured,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, (first, middle, last) in measured["rss_mb_median_by_third"].items():
        print(f"{name}: RSS median {first:.1f} -> {middle:.1f} -> {last:.1f} MB by thirds")
    print(f"plateau: {measured['plateau']} ({args.minutes:g} min at {args.speedup:g}x: about "
          f"{args.minutes * args.speedup:.0f} minutes of a fleet's control plane); wrote {out}")


if __name__ == "__main__":
    main()
