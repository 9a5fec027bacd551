"""The node's and the fleet commands' parts that need no pipeline: run settings made from a camera's
options and a job, settings checks, the commands' usage errors, metrics, and `fleet jobs` telling
a node gone from a node at work (against a real server)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
from maskstream.pipeline.cli.main import build_parser
from maskstream.pipeline.client import Subscriber
from maskstream.pipeline.config import ConfigError, dump_config
from maskstream.pipeline.fleet.config import FleetConfig, NatsConfig
from maskstream.pipeline.fleet.connection import FleetClient, wait_for
from maskstream.pipeline.fleet.jobs import JobWorker
from maskstream.pipeline.fleet.leases import Camera, CameraRegistry, LeaseManager
from maskstream.pipeline.fleet.node import Node, NodeSettings, camera_run_config, check_socket_paths, job_run_config
from maskstream.pipeline.fleet.runs import Silence
from maskstream.pipeline.run_config import IPC_PATH_MAX, RunConfig, SourceOptions, TransportOptions

from tests.fleet_nodes import maskstream

ENDPOINT = "ipc:///tmp/x.pub"


def test_a_camera_runs_live_with_its_options_as_source_settings():
    base = RunConfig(sources=("ignored.mp4",), workers=2, source=SourceOptions(max_reconnects=3))
    cfg = camera_run_config(base, Camera("door", "rtsp://10.0.0.7/s", {"rtsp_transport": "udp",
                                                                       "reconnect_backoff_s": "[0.1, 2.0]"}), ENDPOINT)
    assert cfg.sources == ("rtsp://10.0.0.7/s",) and cfg.workers == 2
    assert cfg.source == SourceOptions(policy="live", rtsp_transport="udp", reconnect_backoff_s=(0.1, 2.0),
                                       max_reconnects=3)
    assert cfg.outputs.publish == ENDPOINT and cfg.outputs.jsonl is None and cfg.outputs.metrics_port is None
    offline = camera_run_config(base, Camera("file", "/x.mp4", {"policy": "offline"}), ENDPOINT)
    assert offline.source.policy == "offline"
    with pytest.raises(ConfigError, match="polcy"):
        camera_run_config(base, Camera("door", "rtsp://x", {"polcy": "live"}), ENDPOINT)
    with pytest.raises(ConfigError, match="rtsp_transport"):
        camera_run_config(base, Camera("door", "rtsp://x", {"rtsp_transport": "carrier-pigeon"}), ENDPOINT)


def test_a_job_runs_offline_whatever_the_base_says():
    base = RunConfig(source=SourceOptions(policy="live", rate_fps=5.0))
    cfg = job_run_config(base, "/archive/a.mp4", ENDPOINT)
    assert cfg.sources == ("/archive/a.mp4",) and cfg.source.policy == "offline"
    assert cfg.outputs.publish == ENDPOINT


def test_node_settings_are_checked():
    with pytest.raises(ValueError, match="capacity"):
        NodeSettings("a", 0, RunConfig())
    with pytest.raises(ValueError, match="node name"):
        NodeSettings(" a", 1, RunConfig())
    with pytest.raises(ValueError, match="restart_backoff_s"):
        NodeSettings("a", 1, RunConfig(), restart_backoff_s=(5.0, 1.0))
    for standby in (-1, True, 1.5):
        with pytest.raises(ValueError, match="standby"):
            NodeSettings("a", 1, RunConfig(), standby=standby)
    assert NodeSettings("a", 1, RunConfig()).standby == 1 and NodeSettings("a", 1, RunConfig(), standby=0).standby == 0
    for timeout_s in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="standby_ready_timeout_s"):
            NodeSettings("a", 1, RunConfig(), standby_ready_timeout_s=timeout_s)
    for timeout_s in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="hung_timeout_s"):
            NodeSettings("a", 1, RunConfig(), hung_timeout_s=timeout_s)
    for retry_s in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="standby_retry_s"):
            NodeSettings("a", 1, RunConfig(), standby_retry_s=retry_s)
    assert NodeSettings("a", 1, RunConfig(), standby_retry_s=0.0).standby_retry_s == 0.0
    with pytest.raises(ValueError, match="labels: key 'a b'"):
        NodeSettings("a", 1, RunConfig(), labels={"a b": "x"})


def test_silence_counts_on_the_loop_clock_from_the_last_message():
    silence = Silence()
    assert (silence.silent_s(10.0), silence.silent_s(12.5), silence.heard) == (0.0, 2.5, 0)
    silence.hear()
    assert silence.silent_s(13.0) == 0.0 and silence.silent_s(20.0) == 7.0
    silence.hear()
    silence.hear()
    assert silence.silent_s(20.5) == 0.0 and silence.heard == 3


def test_standby_count_from_the_command_line():
    def standby(*args: str) -> int:
        return build_parser().parse_args(["node", *args]).standby

    assert (standby(), standby("--standby", "3"), standby("--standby", "0"), standby("--no-standby")) == (1, 3, 0, 0)
    with pytest.raises(SystemExit):
        standby("--standby", "-1")


def test_standby_and_hung_timings_from_the_command_line_default_to_the_node_settings():
    def parse(*args: str) -> tuple[float, float, float]:
        args_ = build_parser().parse_args(["node", *args])
        return args_.standby_ready_timeout, args_.standby_retry, args_.hung_timeout

    defaults = NodeSettings("a", 1, RunConfig())
    assert parse() == (defaults.standby_ready_timeout_s, defaults.standby_retry_s, defaults.hung_timeout_s)
    assert parse("--standby-ready-timeout", "45", "--standby-retry", "0", "--hung-timeout", "5") == (45.0, 0.0, 5.0)
    for bad in (("--standby-ready-timeout", "0"), ("--standby-ready-timeout", "nan"), ("--standby-retry", "-1"),
                ("--standby-retry", "soon"), ("--hung-timeout", "0"), ("--hung-timeout", "-3")):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_a_node_refuses_a_socket_folder_too_deep_at_its_start_before_nats(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    # NATS at a port nobody listens on: reaching for it would fail with exit 1, "cannot connect"
    done = maskstream("node", "--nats", "nats://127.0.0.1:1", "--name", "a", "--set",
                      f"transport.endpoint_dir={deep}")
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: transport.endpoint_dir: the socket path {deep}/maskstream-node-")
    assert f"longer than the {IPC_PATH_MAX} bytes an ipc:// address may have" in error
    assert "NATS" not in done.stderr and not list(deep.iterdir())
    # the pipelines' sockets are checked too (a folder deep enough for the node's, not for theirs)
    runs = RunConfig(workers=2, transport=TransportOptions(endpoint_dir=deep))
    with pytest.raises(ValueError, match="maskstream-x+/preprocess-0 is longer than"):
        check_socket_paths(runs, tmp_path)
    check_socket_paths(RunConfig(workers=2), None)  # the system's temporary folder


def test_usage_errors_are_said_before_anything_is_reached():
    bad = maskstream("fleet", "add", "door", "rtsp://x", "--option", "polcy=live", "--nats", "nats://127.0.0.1:1")
    assert bad.returncode == 2 and "unknown key 'polcy'" in bad.stderr
    bad = maskstream("fleet", "add", "door", "rtsp://x", "--option", "novalue", "--nats", "nats://127.0.0.1:1")
    assert bad.returncode == 2 and "expected KEY=VALUE" in bad.stderr
    bad = maskstream("subscribe", "tcp://127.0.0.1:5556", "--from-seq", "3")
    assert bad.returncode == 2 and "--from-seq" in bad.stderr
    bad = maskstream("subscribe", "tcp://127.0.0.1:5556", "--fleet-set", "replicas=3")
    assert bad.returncode == 2 and "--fleet-set are for NATS endpoints" in bad.stderr, bad.stderr
    bad = maskstream("subscribe", "--stream", "door")
    assert bad.returncode == 2 and bad.stderr.startswith("error: no endpoint: give"), bad.stderr
    bad = maskstream("subscribe", "tcp://127.0.0.1:5556", "--nats", "nats://127.0.0.1:1")
    assert bad.returncode == 2 and "or --nats, not both" in bad.stderr, bad.stderr
    bad = maskstream("subscribe", "--nats", "ws://127.0.0.1:1")
    assert bad.returncode == 2 and "by nats:// or tls://" in bad.stderr, bad.stderr
    bad = maskstream("subscribe", "--nats", "127.0.0.1:4222")
    assert bad.returncode == 2 and "'127.0.0.1:4222' is not a server URL" in bad.stderr, bad.stderr
    bad = maskstream("node", "--nats", "nats://10.1.2.3:4222", "--name", "a")
    assert bad.returncode == 2 and "off loopback without TLS" in bad.stderr
    bad = maskstream("node", "--nats", "nats://127.0.0.1:1", "--label", "site=lobby", "--label", "gpu")
    assert bad.returncode == 2 and bad.stderr == "error: --label gpu: expected KEY=VALUE\n", bad.stderr
    bad = maskstream("node", "--nats", "nats://127.0.0.1:1", "--label", "site=lobby", "--label", "site=yard")
    assert bad.returncode == 2 and "--label site=yard: site is given twice (site=lobby)" in bad.stderr, bad.stderr
    bad = maskstream("fleet", "add", "door", "rtsp://x", "--require", "site=the lobby", "--nats", "nats://127.0.0.1:1")
    assert bad.returncode == 2 and "--require site=the lobby: value 'the lobby' must be" in bad.stderr, bad.stderr
    bad = maskstream("fleet", "add", "door", "rtsp://x", "--require", "=x", "--nats", "nats://127.0.0.1:1")
    assert bad.returncode == 2 and "--require =x: key ''" in bad.stderr, bad.stderr
    bad = maskstream("fleet", "add", "door", "rtsp://x", "--require", "site=lobby||yard", "--nats", "nats://127.0.0.1:1")
    assert bad.returncode == 2 and "--require site=lobby||yard: value '' must be" in bad.stderr, bad.stderr
    bad = maskstream("fleet", "add", "door", "rtsp://x", "--require", "site=yard|yard", "--nats", "nats://127.0.0.1:1")
    assert bad.returncode == 2 and "site=yard|yard names an alternative twice" in bad.stderr, bad.stderr
    bad = maskstream("node", "--label", "site=lobby|yard", "--nats", "nats://127.0.0.1:1")
    assert bad.returncode == 2 and "--label site=lobby|yard: value 'lobby|yard' must be" in bad.stderr, bad.stderr
    with pytest.raises(ValueError, match="from_seq"):
        Subscriber("tcp://127.0.0.1:5556", from_seq=1)


def test_unreachable_fleet_is_exit_status_1(tmp_path):
    done = maskstream("fleet", "list", "--nats", "nats://127.0.0.1:1", "--fleet-set", "nats.connect_timeout_s=0.2",
                      "--fleet-set", "nats.reconnect_wait_s=0.1")
    assert done.returncode == 1 and "cannot connect to NATS" in done.stderr


@pytest.fixture
def cli_fleet(nats_server, tmp_path):
    config = FleetConfig(nats=NatsConfig(urls=(nats_server.url,), reconnect_wait_s=0.2, request_timeout_s=2.0))
    path = tmp_path / "fleet.yaml"
    path.write_text(dump_config(config))
    return config, path


def test_fleet_jobs_tells_a_node_gone_from_a_node_at_work(cli_fleet, tmp_path):
    config, path = cli_fleet
    clips = [tmp_path / f"{name}.mp4" for name in ("a", "b")]
    for clip in clips:
        clip.write_bytes(b"read by nobody here")
    missing = maskstream("fleet", "submit", str(tmp_path / "nowhere.mp4"), "--fleet-config", str(path))
    assert missing.returncode == 2 and "nowhere.mp4" in missing.stderr and not missing.stdout
    done = maskstream("fleet", "submit", *map(str, clips), "--no-check", "--fleet-config", str(path))
    assert done.returncode == 0, done.stderr
    ids = [line.split("\t")[0] for line in done.stdout.splitlines()]
    with FleetClient.connect(config, name="ghost") as ghost, FleetClient.connect(config, name="alive") as alive:
        # "ghost" took a job and left no presence (as a SIGKILLed node); "alive" runs one and says so
        assert JobWorker(ghost, "ghost").take(timeout_s=5).job_id == ids[0]
        assert JobWorker(alive, "alive").take(timeout_s=5).job_id == ids[1]
        manager = LeaseManager(alive, "alive", 1)
        manager.start()
        manager.set_jobs([ids[1]])
        try:
            listed = maskstream("fleet", "jobs", "--json", "--fleet-config", str(path))
            table = maskstream("fleet", "jobs", "--fleet-config", str(path))
        finally:
            manager.stop()
    assert listed.returncode == 0, listed.stderr
    rows = {row["job"]: row for row in json.loads(listed.stdout)}
    assert (rows[ids[0]]["state"], rows[ids[0]]["node"], rows[ids[0]]["node_gone"]) == ("running", "ghost", True)
    assert (rows[ids[1]]["state"], rows[ids[1]]["node"], rows[ids[1]]["node_gone"]) == ("running", "alive", False)
    assert "ghost (gone)" in table.stdout and "alive (gone)" not in table.stdout


def test_cameras_listed_and_node_metrics_before_any_work(cli_fleet):
    config, path = cli_fleet
    done = maskstream("fleet", "add", "door", "rtsp://127.0.0.1:8554/door", "--option", "rtsp_transport=udp",
                      "--require", "site=lobby", "--fleet-config", str(path))
    assert done.returncode == 0 and done.stderr == "", done.stderr  # nothing to say (its own close is no news)
    listed = json.loads(maskstream("fleet", "list", "--json", "--fleet-config", str(path)).stdout)
    assert listed == [{"name": "door", "url": "rtsp://127.0.0.1:8554/door", "options": {"rtsp_transport": "udp"},
                       "requires": {"site": "lobby"}}]
    table = maskstream("fleet", "list", "--fleet-config", str(path)).stdout.splitlines()
    assert [line.split() for line in table] == [["CAMERA", "URL", "OPTIONS", "REQUIRES"],
                                                ["door", "rtsp://127.0.0.1:8554/door", "rtsp_transport=udp",
                                                 "site=lobby"]]
    status = json.loads(maskstream("fleet", "status", "--json", "--fleet-config", str(path)).stdout)
    assert status == {"cameras": [{"camera": "door", "url": "rtsp://127.0.0.1:8554/door",
                                   "requires": {"site": "lobby"}, "node": None,
                                   "waiting_for": "a node with site=lobby", "since_s": None, "frames_per_s": None,
                                   "frames": None, "drops": None, "last_error": None}], "nodes": []}
    # a node of another site is up: the camera still waits, saying for what; the node shows its labels
    with FleetClient.connect(config, name="yard-1") as client:
        manager = LeaseManager(client, "yard-1", 2, {"site": "yard", "gpu": "yes"})
        manager.start()
        try:
            status = json.loads(maskstream("fleet", "status", "--json", "--fleet-config", str(path)).stdout)
            table = maskstream("fleet", "status", "--fleet-config", str(path))
        finally:
            manager.stop()
    assert [(c["node"], c["waiting_for"]) for c in status["cameras"]] == [(None, "a node with site=lobby")]
    assert [(n["node"], n["labels"]) for n in status["nodes"]] == [("yard-1", {"site": "yard", "gpu": "yes"})]
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["CAMERA", "NODE", "FRAMES/S", "FRAMES", "DROPS", "REQUIRES", "LAST", "ERROR"]
    assert lines[1].split() == ["door", "(waiting", "for", "a", "node", "with", "site=lobby)", "-", "-", "-",
                                "site=lobby"], table.stdout
    assert lines[3].split()[:2] == ["NODE", "CAMERAS"] and lines[3].split()[-1] == "LABELS"
    assert lines[4].split()[0] == "yard-1" and lines[4].split()[-1] == "gpu=yes,site=yard", table.stdout
    with FleetClient.connect(config, name="metrics") as client:
        text = Node(client, NodeSettings("a", 3, RunConfig())).metrics_text()
    for line in ('maskstream_node_capacity{stage="node"} 3', 'maskstream_node_streams{stage="node"} 0',
                 'maskstream_node_leases_held{stage="node"} 0', 'maskstream_nats_connected{stage="node"} 1',
                 'maskstream_node_job_redeliveries_total{stage="node"} 0'):
        assert line in text, text
    assert "# TYPE maskstream_node_job_redeliveries_total counter" in text
    removed = maskstream("fleet", "remove", "door", "--fleet-config", str(path))
    assert removed.returncode == 0 and removed.stderr == "", removed.stderr
    assert removed.stdout == "removed camera door\n"
    table = maskstream("fleet", "status", "--fleet-config", str(path))
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == [
        "CAMERA", "NODE", "FRAMES/S", "FRAMES", "DROPS", "REQUIRES", "LAST", "ERROR"], table.stderr
    assert json.loads(maskstream("fleet", "list", "--json", "--fleet-config", str(path)).stdout) == []


def test_a_node_started_under_a_live_nodes_name_exits_1_naming_it(cli_fleet):
    """Two nodes on one host left at --name's default: the second says so and exits."""
    config, path = cli_fleet
    with FleetClient.connect(config, name="live") as client:
        live = LeaseManager(client, "shared-name", 1)
        live.start()
        try:
            twin = maskstream("node", "--name", "shared-name", "--fleet-config", str(path), "--no-standby",
                              timeout_s=120)
            # what `fleet status` says of the live one: where it runs, with its presence written again
            wait_for(lambda: [n.instance for n in CameraRegistry(client).nodes()] == [live.instance], 10,
                     "the live node's presence written again")
            status = json.loads(maskstream("fleet", "status", "--json", "--fleet-config", str(path)).stdout)
            [row] = status["nodes"]
            assert row | {"up_s": 0} == {"node": "shared-name", "cameras": 0, "jobs": [], "capacity": 1,
                                          "standby_ready": 0, "labels": {}, "up_s": 0, "host": socket.gethostname(),
                                          "pid": os.getpid()}, row
        finally:
            live.stop()
    assert twin.returncode == 1, twin.stderr
    assert re.search(r"^error: node name 'shared-name' is in use by another live node \(on host \S+, pid \d+, "
                     r"started \d+ s ago\); give each node its own --name$", twin.stderr, re.M), twin.stderr
    assert live.error is None


def test_fleet_wait_follows_jobs_to_their_end(cli_fleet, tmp_path):
    """`fleet wait` in its own process while a worker here takes both jobs: progress lines on stderr, a
    line per job on stdout as it ends, exit 1 since one failed; a job that does not end within --timeout
    and an unknown id are exit 1 too, saying so."""
    config, path = cli_fleet
    clips = [tmp_path / f"{name}.mp4" for name in ("a", "b", "c")]
    for clip in clips:
        clip.write_bytes(b"read by nobody here")
    done = maskstream("fleet", "submit", *map(str, clips), "--no-check", "--fleet-config", str(path))
    assert done.returncode == 0, done.stderr
    first, second, third = [line.split("\t")[0] for line in done.stdout.splitlines()]
    waiter = subprocess.Popen([sys.executable, "-m", "maskstream.pipeline.cli", "fleet", "wait", first, second,
                               "--fleet-config", str(path), "--progress-every", "0.2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(waiter.stderr), daemon=True)
    reader.start()
    try:
        with FleetClient.connect(config, name="worker") as client:
            worker = JobWorker(client, "w")
            a, b = worker.take(timeout_s=5), worker.take(timeout_s=5)
            assert (a.job_id, b.job_id) == (first, second)
            a.report(5, 10, 2.0)
            # the waiter reads it (every second) and logs it (every 0.2 s, not on a terminal)
            progress = re.compile(rf"{first}: 5/10 frames \(50%\).*running on w")
            wait_for(lambda: any(progress.search(line) for line in list(err_lines)), 30, "the job's progress line")
            assert a.done(frames=10)
            assert b.fail("corrupt file: moov atom not found")
            worker.close()
        out = waiter.stdout.read()
        waiter.wait(timeout=30)
        reader.join(10)
    finally:
        waiter.kill()
    assert waiter.returncode == 1, "".join(err_lines)
    assert out.splitlines() == [f"{first}\tdone\t10 frames", f"{second}\tfailed\t0 frames\tcorrupt file: moov atom "
                                                                 "not found"], out

    late = maskstream("fleet", "wait", third, "--timeout", "1", "--quiet", "--fleet-config", str(path))
    assert late.returncode == 1 and f"1 of 1 jobs not ended within 1 s ({third}); they go on" in late.stderr
    unknown = maskstream("fleet", "wait", "nope-00000000", "--fleet-config", str(path))
    assert unknown.returncode == 1 and "no job 'nope-00000000'" in unknown.stderr
