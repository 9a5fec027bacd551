"""Cameras and leases against a real server: runtime add/remove, spread by capacity, failover after SIGKILL."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import weakref
from dataclasses import replace

import pytest
from maskstream.pipeline.config import dump_config
from maskstream.pipeline.fleet import records
from maskstream.pipeline.fleet.config import FleetConfig, LeaseConfig, NatsConfig
from maskstream.pipeline.fleet.connection import WATCH_INACTIVE_S, FleetClient, FleetUnavailable
from maskstream.pipeline.fleet.connection import wait_for as first_value  # the predicate's first true value
from maskstream.pipeline.fleet.leases import (
    CameraExists,
    CameraNotFound,
    CameraRegistry,
    CameraStatus,
    Lease,
    LeaseManager,
    NodeNameInUse,
)
from maskstream.pipeline.fleet.results import stream_token

from tests.fleet_agent import Agent
from tests.net_fault import Relay

FAILOVER_GOAL_S = 10.0
RUNTIME_CHANGE_S = 5.0  # a camera added or removed takes effect within this (as in test_fleet_node)
READ_YOUR_WRITES_TRIALS = 100
CONNECTION_START_S = 1.0  # a client's connection to a live server on loopback: TCP, INFO, CONNECT, PING/PONG


@pytest.fixture
def config(nats_server):
    # the lease settings are the defaults: the failover measured here is the one users get
    return FleetConfig(nats=NatsConfig(urls=(nats_server.url,), reconnect_wait_s=0.2, request_timeout_s=2.0))


@pytest.fixture
def registry(config):
    with FleetClient.connect(config, name="admin") as client:
        reg = CameraRegistry(client)
        reg.ensure()
        yield reg


@pytest.fixture
def nodes(config):
    """Start lease managers (each on its own connection); all stopped at the end."""
    made = []

    def start(name, capacity, labels=None):
        client = FleetClient.connect(config, name=name)
        manager = LeaseManager(client, name, capacity, labels)
        manager.start()
        made.append(manager)
        return manager

    yield start
    for manager in made:
        manager.stop()
        manager.client.close()


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"{what} not within {timeout_s} s")


_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # events read but not yet asked for


def first_event(manager, kind, camera, timeout_s):
    """The first not yet returned event of that kind for that camera (others are kept for later calls)."""
    seen = _seen.setdefault(manager, [])
    deadline = time.monotonic() + timeout_s
    while True:
        for i, event in enumerate(seen):
            if event.kind == kind and event.camera.name == camera:
                return seen.pop(i)
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind} event for {camera} on {manager.node} within {timeout_s} s: {seen}")
        seen.extend(manager.events(timeout_s=left))


def test_cameras_are_added_replaced_listed_and_removed(registry):
    registry.add("door", "rtsp://127.0.0.1:8554/door", {"rtsp_transport": "udp"})
    registry.add("yard.north", "rtsp://127.0.0.1:8554/yard")
    with pytest.raises(CameraExists, match="door"):
        registry.add("door", "rtsp://elsewhere")
    registry.add("door", "rtsp://127.0.0.1:8554/door2", replace=True)
    assert [(c.name, c.url) for c in registry.cameras()] == [
        ("door", "rtsp://127.0.0.1:8554/door2"), ("yard.north", "rtsp://127.0.0.1:8554/yard")]
    registry.remove("yard.north")
    with pytest.raises(CameraNotFound):
        registry.remove("yard.north")
    assert [c.name for c in registry.cameras()] == ["door"]
    assert [(row.camera.name, row.lease) for row in registry.status()] == [("door", None)]
    with pytest.raises(ValueError, match="camera name"):
        registry.add(" bad", "rtsp://x")


def test_runtime_add_update_and_remove_take_effect_within_seconds(registry, nodes):
    node = nodes("host-a", capacity=4)
    added = time.monotonic()
    registry.add("cam0", "rtsp://127.0.0.1:8554/a")
    acquired = first_event(node, "acquired", "cam0", timeout_s=5)
    assert acquired.at - added < 3.0 and node.held()["cam0"].url == "rtsp://127.0.0.1:8554/a"

    registry.add("cam0", "rtsp://127.0.0.1:8554/b", replace=True)
    updated = first_event(node, "updated", "cam0", timeout_s=5)
    assert updated.camera.url == "rtsp://127.0.0.1:8554/b"

    node.report("cam0", CameraStatus(frames_per_s=12.5, frames=300, drops=2, last_error="stall at 12:00"))
    # any(): under load a read may come back before the camera's row does; that is "not yet", not a failure
    wait_for(lambda: any(r.lease is not None and r.lease.status.frames == 300 for r in registry.status()),
             timeout_s=5, what="the reported status in the lease")
    (row,) = registry.status()
    assert (row.lease.node, row.lease.status.frames_per_s, row.lease.status.drops) == ("host-a", 12.5, 2)
    (info,) = registry.nodes()
    assert (info.name, info.capacity, info.held) == ("host-a", 4, 1)

    removed = time.monotonic()
    registry.remove("cam0")
    released = first_event(node, "released", "cam0", timeout_s=5)
    assert released.at - removed < 3.0 and node.held() == {}
    wait_for(lambda: registry.status() == [], timeout_s=5, what="the lease gone")
    print(f"camera add -> acquired {1000 * (acquired.at - added):.0f} ms, "
          f"remove -> released {1000 * (released.at - removed):.0f} ms")


def test_cameras_spread_within_capacity_and_never_on_two_nodes(registry, nodes):
    a, b = nodes("host-a", capacity=2), nodes("host-b", capacity=3)
    names = [f"cam{i}" for i in range(6)]
    for name in names:
        registry.add(name, f"rtsp://127.0.0.1:8554/{name}")
    wait_for(lambda: len(a.held()) + len(b.held()) == 5, timeout_s=10, what="5 of 6 cameras held")
    until = time.monotonic() + 2.5  # past claim_grace_s: nobody over capacity, nothing held twice, all the while
    while time.monotonic() < until:
        held_a, held_b = set(a.held()), set(b.held())
        assert len(held_a) <= 2 and len(held_b) <= 3 and not held_a & held_b
        time.sleep(0.05)
    held_a, held_b = set(a.held()), set(b.held())
    assert len(held_a) == 2 and len(held_b) == 3 and not held_a & held_b
    rows = {row.camera.name: row.lease.node if row.lease else None for row in registry.status()}
    assert rows == {**dict.fromkeys(held_a, "host-a"), **dict.fromkeys(held_b, "host-b"),
                    **dict.fromkeys(set(names) - held_a - held_b, None)}

    # a node that joins takes the camera nobody had room for; running cameras stay where they are
    c = nodes("host-c", capacity=4)
    wait_for(lambda: len(c.held()) == 1, timeout_s=5, what="host-c takes the free camera")
    assert set(a.held()) == held_a and set(b.held()) == held_b

    # a clean stop gives the cameras back at once: host-c takes both without waiting for the TTL
    stopped = time.monotonic()
    a.stop()
    taken = wait_for(lambda: held_a <= set(c.held()), timeout_s=5, what="host-c takes host-a's cameras")
    assert taken - stopped < 2.0
    assert not set(b.held()) & set(c.held())


def test_cameras_run_only_on_nodes_with_the_labels_they_require(registry, nodes, config):
    """Requirements against node labels: planned only onto nodes that satisfy them, never claimed by
    another past claim_grace_s; one nobody satisfies waits and is taken when such a node joins; one
    whose requirements change under it moves, its holder releasing it with the reason."""
    lobby = nodes("lobby-1", capacity=4, labels={"site": "lobby", "gpu": "yes"})
    yard = nodes("yard-1", capacity=4, labels={"site": "yard"})
    plain = nodes("plain", capacity=4)  # no labels: the least loaded, with room, all along
    registry.add("lobby-a", "rtsp://10.1.0.1/a", requires={"site": "lobby"})
    registry.add("lobby-4k", "rtsp://10.1.0.2/4k", requires={"site": "lobby", "gpu": "yes"})
    registry.add("yard-a", "rtsp://10.2.0.1/a", requires={"site": "yard"})
    registry.add("roof-a", "rtsp://10.3.0.1/a", requires={"site": "roof"})
    registry.add("any", "rtsp://10.4.0.1/a")
    registry.add("gate", "rtsp://10.5.0.1/a", requires={"site": "roof|yard"})  # either site: yard-1 is up
    wait_for(lambda: set(lobby.held()) == {"lobby-a", "lobby-4k"} and set(yard.held()) == {"yard-a", "gate"}
             and len(plain.held()) == 1, timeout_s=RUNTIME_CHANGE_S, what="each camera on a node that satisfies it")
    until = time.monotonic() + config.leases.claim_grace_s + 1.0  # the orphan path too: nothing moves, roof waits
    while time.monotonic() < until:
        assert (set(lobby.held()), set(yard.held()), set(plain.held())) == ({"lobby-a", "lobby-4k"},
                                                                            {"yard-a", "gate"}, {"any"})
        time.sleep(0.05)
    assert {row.camera.name: row.lease for row in registry.status()}["roof-a"] is None
    assert plain.unclaimed() == [] and lobby.unclaimed() == []  # roof-a holds back no node's jobs
    assert {info.name: info.labels for info in registry.nodes()} == {
        "lobby-1": {"site": "lobby", "gpu": "yes"}, "yard-1": {"site": "yard"}, "plain": {}}

    joined = time.monotonic()
    roof = nodes("roof-1", capacity=1, labels={"site": "roof"})
    taken = wait_for(lambda: set(roof.held()) == {"roof-a"}, timeout_s=RUNTIME_CHANGE_S, what="roof-1 takes roof-a")
    print(f"a matching node joined -> camera held {1000 * (taken - joined):.0f} ms")

    # lobby-4k's requirements change but lobby-1 still satisfies them: its run is left alone
    registry.add("lobby-4k", "rtsp://10.1.0.2/4k", requires={"gpu": "yes"}, replace=True)
    changed = time.monotonic()
    registry.add("yard-a", "rtsp://10.2.0.1/a", requires={"site": "lobby"}, replace=True)
    released = first_event(yard, "released", "yard-a", timeout_s=RUNTIME_CHANGE_S)
    assert released.reason == "camera requires site=lobby, which node yard-1 does not offer", released.reason
    moved = wait_for(lambda: "yard-a" in lobby.held(), timeout_s=RUNTIME_CHANGE_S, what="yard-a moved to lobby-1")
    assert set(yard.held()) == {"gate"} and set(plain.held()) == {"any"}  # gate stays: yard-1 still satisfies it
    assert lobby.held()["yard-a"].requires == {"site": "lobby"}
    assert first_event(lobby, "acquired", "yard-a", timeout_s=1).camera.requires == {"site": "lobby"}
    later = [event for event in lobby.events(timeout_s=0.5) + _seen.get(lobby, []) if event.camera.name == "lobby-4k"]
    assert [event.kind for event in later] == ["acquired"], later  # its first acquisition only: no restart
    assert lobby.held()["lobby-4k"].requires == {"gpu": "yes"}
    print(f"requirements changed -> moved {1000 * (moved - changed):.0f} ms")


@contextlib.contextmanager
def agent_holding_two_cameras(registry, config, tmp_path, name):
    """A node in a process of its own (SIGKILL-able: Agent) holding cam0 and cam1."""
    path = tmp_path / "fleet.yaml"
    path.write_text(dump_config(config))
    agent = Agent(str(path), "lease", name, "2")
    try:
        agent.expect("READY", timeout_s=30)
        registry.add("cam0", "rtsp://127.0.0.1:8554/cam0")
        registry.add("cam1", "rtsp://127.0.0.1:8554/cam1")
        assert {agent.expect("ACQUIRED", timeout_s=10).split()[1] for _ in range(2)} == {"cam0", "cam1"}
        yield agent
    finally:
        agent.close()


def test_a_sigkilled_node_loses_its_cameras_to_the_other_within_the_goal(registry, nodes, config, tmp_path):
    with agent_holding_two_cameras(registry, config, tmp_path, "doomed") as agent:
        survivor = nodes("survivor", capacity=2)
        time.sleep(1.5)  # the survivor renews its presence; the agent keeps both cameras
        assert survivor.held() == {}
        assert {row.lease.node for row in registry.status()} == {"doomed"}

        killed = agent.kill()
        times = {}
        for name in ("cam0", "cam1"):
            event = first_event(survivor, "acquired", name, timeout_s=FAILOVER_GOAL_S + 5)
            times[name] = event.at - killed
        assert set(survivor.held()) == {"cam0", "cam1"}
        wait_for(lambda: {row.lease.node for row in registry.status() if row.lease} == {"survivor"},
                 timeout_s=5, what="status showing the survivor")
    assert max(times.values()) < FAILOVER_GOAL_S, times
    print("lease failover after SIGKILL: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(times.items())))


def test_a_node_restarted_at_once_leaves_its_cameras_to_warm_standbys(registry, nodes, config, tmp_path):
    """A service manager restarts a SIGKILLed node at once, under its name, before its leases expired.
    The restart is a new start of it, with no pipeline warm: the cameras go to the node whose
    standbys wait warm, not back to the restarted one by its name."""
    with agent_holding_two_cameras(registry, config, tmp_path, "host-a") as agent:
        warm = nodes("host-b", capacity=2)
        warm.set_ready(2)
        wait_for(lambda: any(info.name == "host-b" and info.ready == 2 for info in registry.nodes()), 5,
                 "host-b's two warm standbys in its presence")
        killed = agent.kill()
        restarted = nodes("host-a", capacity=2)  # in the fleet before the leases expire: a new instance
        restart_s = time.monotonic() - killed
        assert restart_s < config.leases.ttl_s - config.leases.renew_interval_s, \
            f"the restart took {restart_s:.2f} s: the leases may have expired before it, which tests nothing"
        for name in ("cam0", "cam1"):
            first_event(warm, "acquired", name, timeout_s=FAILOVER_GOAL_S + 5)
        time.sleep(config.leases.claim_grace_s + 0.5)  # neither moves, nor is claimed by the restart
        assert set(warm.held()) == {"cam0", "cam1"} and restarted.held() == {}
        # the restart took its dead predecessor's presence for what it was: it runs, and claims
        registry.add("cam2", "rtsp://127.0.0.1:8554/cam2")
        first_event(restarted, "acquired", "cam2", timeout_s=5)
        assert restarted.error is None


def test_a_node_started_under_a_live_nodes_name_stops_having_claimed_nothing(registry, nodes, config, caplog):
    """Two nodes on one host left at --name's default: the later start stops with an error naming
    the live one; the live one goes on with its cameras."""
    live = nodes("host-a", capacity=1)
    registry.add("cam0", "rtsp://127.0.0.1:8554/cam0")
    registry.add("cam1", "rtsp://127.0.0.1:8554/cam1")  # free: the live node has no room for it
    first_event(live, "acquired", "cam0", timeout_s=5)
    with FleetClient.connect(config, name="twin") as client:
        twin = LeaseManager(client, "host-a", capacity=2)
        with caplog.at_level(logging.WARNING):
            twin.start()
            wait_for(lambda: twin.error is not None, 5, "the later start stopped")
            assert isinstance(twin.error, NodeNameInUse)
            message = str(twin.error)
            assert message.startswith("node name 'host-a' is in use by another live node (on host ") and \
                f"pid {os.getpid()}, started" in message and message.endswith("give each node its own --name")
            assert not [e for e in twin.events() if e.kind == "acquired"] and twin.held() == {}
            twin.stop()
            wait_for(lambda: "another node started under this name" in caplog.text, 5, "the live node's warning")
    time.sleep(config.leases.renew_interval_s * 2)
    assert live.error is None and set(live.held()) == {"cam0"}
    rows = {row.camera.name: row.lease for row in registry.status()}
    assert rows["cam0"].instance == live.instance and rows["cam1"] is None
    [info] = [info for info in registry.nodes() if info.name == "host-a"]
    assert info.instance == live.instance  # its presence written again over the twin's


def kv_consumers(client) -> dict[str, int]:
    """The consumers of each KV bucket's stream, as the server counts them."""
    async def count():
        return {info.config.name: info.state.consumer_count for info in await client.js.streams_info()
                if info.config.name.startswith("KV_")}
    return client.run(count())


def test_watches_leave_no_consumer_behind_them(registry, config, tmp_path):
    """A KV watch is a consumer on a server. nats-py keeps one 5 minutes after its watcher went (its
    default inactive threshold), so every `fleet status`, every lease manager stopped, every node
    SIGKILLed and every watch that started again (its server died) left consumers on the servers for
    that long: benchmarks/fleet_soak.py saw them grow with each fault. With WATCH_INACTIVE_S they go
    that long after their watcher does."""
    baseline = kv_consumers(registry.client)
    registry.add("cam0", "rtsp://127.0.0.1:8554/cam0")
    registry.status()
    registry.cameras()
    path = tmp_path / "fleet.yaml"
    path.write_text(dump_config(config))
    agent = Agent(str(path), "lease", "doomed", "1")
    try:
        agent.expect("READY", timeout_s=30)
        agent.expect("ACQUIRED", timeout_s=10)
        with FleetClient.connect(config, name="stopped") as client:
            manager = LeaseManager(client, "stopped", 1)
            manager.start()
            assert kv_consumers(registry.client)["KV_maskstream_leases"] >= 2  # the two managers' watches
            manager.stop()
        agent.kill()
    finally:
        agent.close()
    gone_by = time.monotonic() + WATCH_INACTIVE_S + 10  # the server's inactivity check, on a busy host
    while (left := kv_consumers(registry.client)) != baseline:
        assert time.monotonic() < gone_by, f"consumers left: {left}, before: {baseline}"
        time.sleep(0.5)


def two_cameras_each(registry, cut, steady) -> list[str]:
    """Both lease managers present, four cameras added and spread two and two: the cut one's names."""
    wait_for(lambda: {info.name for info in registry.nodes()} == {"steady", "cut"}, 10, "both nodes present")
    for i in range(4):
        registry.add(f"cam{i}", f"rtsp://127.0.0.1:8554/cam{i}")
    wait_for(lambda: len(cut.held()) == 2 and len(steady.held()) == 2, 10, "two cameras on each node")
    return sorted(cut.held())


@contextlib.contextmanager
def one_camera_and_an_idle_node(config):
    """An admin client (and its registry) that added cam0, and a started lease manager of host-a with
    no room yet (the test gives it some), stopped at the end."""
    with FleetClient.connect(config, name="admin") as admin, FleetClient.connect(config, name="host-a") as client:
        registry = CameraRegistry(admin)
        registry.ensure()
        registry.add("cam0", "rtsp://127.0.0.1:8554/cam0")
        node = LeaseManager(client, "host-a", capacity=0)
        node.start()
        try:
            yield admin, registry, node
        finally:
            node.stop()


def test_a_claim_refused_whose_lease_cannot_be_read_again_leaves_the_manager_running(nats_server, caplog):
    """A claim by compare-and-set on a revision that is gone (the expiry marker the node saw expired
    too) is refused; the node then reads the lease key again, and where nobody answers that read
    (here: no direct gets), the claim waits for the next one, the manager goes on."""
    config = FleetConfig(nats=NatsConfig(urls=(nats_server.url,), reconnect_wait_s=0.2, request_timeout_s=2.0),
                         leases=LeaseConfig(ttl_s=1.0, renew_interval_s=0.4))
    caplog.set_level(logging.INFO, logger="maskstream.pipeline.fleet.leases")
    stream = f"KV_{config.leases.leases_bucket}"
    with one_camera_and_an_idle_node(config) as (admin, registry, node):
        # a holder that died: its lease expires, and the node sees the server's expiry marker
        kv = admin.run(admin.js.key_value(config.leases.leases_bucket))
        stamp = time.time()
        admin.run(kv.put(stream_token("cam0"), records.pack(Lease("cam0", "gone", "0", stamp, stamp))))
        first_value(lambda: node.unclaimed() == [], 5, "the lease in the node's view")
        first_value(lambda: node.unclaimed() == ["cam0"], 10, "the expiry marker in the node's view")

        def direct(allowed: bool) -> None:
            info = admin.run(admin.js.stream_info(stream))
            admin.run(admin.js.update_stream(info.config.evolve(allow_direct=allowed)))

        direct(False)  # the node's reads of single keys go unanswered from now on
        first_value(lambda: admin.run(admin.js.stream_info(stream)).state.messages == 0, 10,
                    "the expiry marker expired")
        node.set_capacity(1)  # its claim expects the marker's revision: refused
        first_value(lambda: any("claim of cam0 refused" in r.getMessage() for r in caplog.records)
                    or node.error is not None, 10, "the claim refused")
        assert node.error is None
        direct(True)  # the next resync reads the key again: the claim expects what is there now
        first_event(node, "acquired", "cam0", timeout_s=10)
        assert node.error is None and set(node.held()) == {"cam0"}


def test_a_claim_stored_but_never_answered_is_held(nats_server, caplog):
    """A claim whose answer never came (the server stalled past nats.request_timeout_s) may be stored
    all the same: the node holds the camera under that lease, instead of leaving it unrenewed and the
    camera unrun until the lease expires and it is claimed anew."""
    config = FleetConfig(nats=NatsConfig(urls=(nats_server.url,), reconnect_wait_s=0.2, request_timeout_s=1.0))
    caplog.set_level(logging.INFO, logger="maskstream.pipeline.fleet.leases")
    with one_camera_and_an_idle_node(config) as (admin, registry, node):
        os.kill(nats_server.pid, signal.SIGSTOP)  # the claim reaches the server's socket, no answer comes
        try:
            node.set_capacity(1)
            first_value(lambda: any("claim of cam0 not answered" in r.getMessage() for r in caplog.records),
                        15, "the claim unanswered")
            resumed = time.time()
        finally:
            os.kill(nats_server.pid, signal.SIGCONT)  # ...and stores it
        acquired = first_event(node, "acquired", "cam0", timeout_s=10)
        rows = first_value(lambda: [row for row in registry.status() if row.lease is not None], 10,
                           "the lease in the status")
        # the lease of the claim sent while the server stalled, not one claimed after it expired
        assert rows[0].lease.instance == node.instance and rows[0].lease.acquired_at < resumed
        assert acquired.camera.name == "cam0" and set(node.held()) == {"cam0"}
        assert [e.kind for e in node.events()] == []  # nothing lost, nothing claimed twice


def test_a_lease_taken_away_is_reported_lost(registry, nodes):
    node = nodes("host-a", capacity=1)
    registry.add("cam0", "rtsp://127.0.0.1:8554/cam0")
    first_event(node, "acquired", "cam0", timeout_s=5)
    # an operator deletes the lease (or the cluster let it expire): the node must stop the camera
    client = node.client
    kv = client.run(client.js.key_value(client.config.leases.leases_bucket))
    client.run(kv.delete(stream_token("cam0")))
    lost = first_event(node, "lost", "cam0", timeout_s=5)
    assert lost.reason
    # the camera is free again and the node has room: it claims it anew, under a later revision
    again = first_event(node, "acquired", "cam0", timeout_s=5)
    assert again.revision > lost.revision


@pytest.mark.parametrize("fault", ["blackhole", "reset"])
def test_a_node_cut_off_the_network_gives_its_cameras_up_before_another_takes_them(registry, nodes, config,
                                                                                   nats_server, fault):
    """A node reaches NATS only through a relay, which then forwards nothing (a pulled cable: TCP sees
    nothing wrong) or resets every connection (a firewall that rejects). The other node claims its cameras
    once their leases expire, ttl_s after the cut-off node's last renewal; the cut-off node must have
    stopped them by then: it gives a camera up ttl_s after sending its last renewal that the cluster
    answered, on its own clock, whatever its connection says. Healed, it takes nothing back and takes new
    cameras again. Default lease settings: the overlap measured is the one users get."""
    leases = config.leases
    steady = nodes("steady", capacity=4)
    with Relay(nats_server.port) as relay:
        cut_config = FleetConfig(nats=replace(config.nats, urls=(relay.url,)))
        with FleetClient.connect(cut_config, name="cut") as cut_client:
            cut = LeaseManager(cut_client, "cut", capacity=2)
            cut.start()
            try:
                theirs = two_cameras_each(registry, cut, steady)
                cut_at = time.monotonic()
                getattr(relay, fault)()
                acquired = {name: first_event(steady, "acquired", name, leases.ttl_s + 10).at for name in theirs}
                # long enough to see how late it is, when it is
                lost = {name: first_event(cut, "lost", name, leases.ttl_s + leases.election_grace_s + 15).at
                        for name in theirs}
                overlap = {name: lost[name] - acquired[name] for name in theirs}
                print(f"{fault}: acquired by the other node " + ", ".join(
                    f"{name} {acquired[name] - cut_at:.2f} s" for name in theirs) + " after the cut; given up by "
                    "the cut-off node " + ", ".join(f"{name} {lost[name] - cut_at:.2f} s" for name in theirs)
                    + "; overlap " + ", ".join(f"{name} {overlap[name]:+.2f} s" for name in theirs))
                assert cut.held() == {} and set(steady.held()) == {"cam0", "cam1", "cam2", "cam3"}
                # the cut-off node stops a camera at its lease's deadline by its own clock, before the server's
                # (which runs from when it stored the renewal); late by no more than one of its checks
                assert max(overlap.values()) <= LeaseManager.check_interval(leases), overlap
                # the other node waited for the leases to expire: at least ttl_s after the cut-off node's last
                # renewal, which was at most renew_interval_s before the cut
                assert min(acquired.values()) - cut_at >= leases.ttl_s - leases.renew_interval_s

                for manager in (cut, steady):  # what came before the heal was asserted above
                    _seen.pop(manager, None)
                    manager.events()
                relay.heal()
                healed = time.monotonic()
                # it comes back: its presence written again
                wait_for(lambda: any(info.name == "cut" and info.renewed_at > time.time() - 2 * leases.renew_interval_s
                                     for info in registry.nodes()), 3 * leases.ttl_s, "the healed node present")
                # no flapping: the cameras stay where they are for a few TTLs
                until = healed + 3 * leases.ttl_s
                while time.monotonic() < until:
                    assert cut.held() == {} and len(steady.held()) == 4
                    time.sleep(0.1)
                events = [*_seen.get(cut, []), *cut.events(), *_seen.get(steady, []), *steady.events()]
                assert [e for e in events if e.kind in ("acquired", "lost")] == []
                # and it takes new cameras again (the other has no room)
                registry.add("cam4", "rtsp://127.0.0.1:8554/cam4")
                first_event(cut, "acquired", "cam4", RUNTIME_CHANGE_S)
                assert set(cut.held()) == {"cam4"} and len(steady.held()) == 4
            finally:
                cut.stop()


def cluster_config(urls):
    return FleetConfig(nats=NatsConfig(urls=tuple(urls), reconnect_wait_s=0.2, request_timeout_s=2.0), replicas=3)


# The tests' own reads of the cluster (first_value: a request nobody answered in time is asked again,
# as the product's reads do; the consumer list waits up to 4 s for every consumer's server).


def leader_of(client, stream, servers):
    name = first_value(lambda: client.run(client.js.stream_info(stream)).cluster.leader, 15, f"{stream}'s leader")
    return next(s for s in servers if s.name == name)


def cameras_watches(admin, config) -> list[str]:
    """The servers that run a watch of the cameras bucket now (its push-bound consumers); FleetUnavailable
    where the list was not answered in time."""
    infos = admin.run(admin.js.consumers_info(f"KV_{config.leases.cameras_bucket}"))
    return [info.cluster.leader for info in infos if info.push_bound and info.cluster is not None]


def start_watching_through(client, admin, server, node, capacity):
    """A LeaseManager whose watch of the cameras bucket runs on `server`, the one it is connected to.
    A watch is an R1 consumer that the cluster places on one of the bucket's servers at random; on
    the node's own server, that server's death leaves the watch lagging until its missed heartbeats
    make it start again: the case a change made right after the death must get through. So the
    manager is started again until its watch is placed there."""
    def one_watch() -> list[str] | None:
        watches = cameras_watches(admin, client.config)
        return watches if len(watches) == 1 else None

    for _ in range(30):
        manager = LeaseManager(client, node, capacity)
        manager.start()
        if first_value(one_watch, 10, "one watch of the cameras bucket") == [server.name]:
            return manager
        manager.stop()
        first_value(lambda: cameras_watches(admin, client.config) == [], 10, "the stopped watch gone")
    raise AssertionError(f"the node's watch of the cameras bucket never placed on {server.name} in 30 starts")


def test_leases_survive_the_death_of_the_server_a_node_is_connected_to(nats_cluster):
    """...and a camera added and one removed right after it reach the node within RUNTIME_CHANGE_S, while
    its watches, cut off with the server, have not caught up yet."""
    config = cluster_config(nats_cluster.urls)
    with FleetClient.connect(config, name="admin") as admin:
        registry = CameraRegistry(admin)
        registry.ensure()
        leases_leader = leader_of(admin, f"KV_{config.leases.leases_bucket}", nats_cluster.servers)
        # the node knows one server, not the one leading the leases bucket, and learns the others from it
        server = next(s for s in nats_cluster.servers if s is not leases_leader)
        # an operator's `fleet add` / `fleet remove` right after the death, through a server that lives
        other = next(s for s in nats_cluster.servers if s is not server)
        with FleetClient.connect(cluster_config([server.url]), name="host-a") as client, \
                FleetClient.connect(cluster_config([other.url]), name="operator") as operator_client:
            operator = CameraRegistry(operator_client)
            node = start_watching_through(client, admin, server, "host-a", capacity=3)
            try:
                registry.add("cam0", "rtsp://127.0.0.1:8554/cam0")
                registry.add("cam1", "rtsp://127.0.0.1:8554/cam1")
                wait_for(lambda: len(node.held()) == 2, timeout_s=10, what="both cameras held")

                def held_rows(names: set[str]) -> list | None:
                    # read again until every camera shows with its lease: the admin's client may be
                    # reconnecting, and a direct read a replica answers may lag the latest writes
                    rows = registry.status()
                    named = {row.camera.name for row in rows if row.lease is not None}
                    return rows if named == names and len(rows) == len(names) else None

                rows = first_value(lambda: held_rows({"cam0", "cam1"}), 10, "both cameras in the status")
                before = {row.camera.name: row.lease.acquired_at for row in rows}
                server.kill()
                killed = time.monotonic()
                # each change timed from the moment the cluster stored it (the call's return: the
                # call itself waits out an election of the cameras bucket, if the server led it,
                # retrying for up to leases.change_timeout_s)
                operator.remove("cam0")
                removed = time.monotonic()
                operator.add("cam2", "rtsp://127.0.0.1:8554/cam2")
                added = time.monotonic()
                released = first_event(node, "released", "cam0", timeout_s=30).at - removed
                acquired = first_event(node, "acquired", "cam2", timeout_s=30).at - added
                print(f"right after the SIGKILL of the node's server: cam0 removed {removed - killed:.2f} s after "
                      f"it, released {released:.2f} s later; cam2 added {added - killed:.2f} s after it, "
                      f"acquired {acquired:.2f} s later")
                assert released <= RUNTIME_CHANGE_S and acquired <= RUNTIME_CHANGE_S
                # two lease TTLs after the kill the node has reconnected to another server and renewed throughout
                time.sleep(max(0.0, killed + 2 * config.leases.ttl_s - time.monotonic()))
                assert [e for e in [*_seen.get(node, []), *node.events()] if e.kind == "lost"] == []
                assert set(node.held()) == {"cam1", "cam2"}
                state = client.state()
                assert state.connected and state.reconnects >= 1 and not state.server.endswith(f":{server.port}")
                rows = first_value(lambda: held_rows({"cam1", "cam2"}), 10, "both cameras in the status")
                assert [row.camera.name for row in rows] == ["cam1", "cam2"]
                assert rows[0].lease.acquired_at == before["cam1"]  # the same lease
                assert all(time.time() - row.lease.renewed_at < 2 * config.leases.renew_interval_s + 1 for row in rows)
            finally:
                node.stop()


def test_a_camera_added_is_listed_at_once_through_any_server(nats_cluster, caplog):
    """Read your writes: the moment `fleet add` returns, `fleet status` and `fleet list` through another
    server list the camera, though the watch that reads the bucket may be placed on a replica that
    has not applied the add yet (one of the bucket's followers is paused while the add commits on
    the other two, then resumed just before the read)."""
    config = cluster_config(nats_cluster.urls)
    caplog.set_level(logging.DEBUG, logger="maskstream.pipeline.fleet.connection")
    clients = [FleetClient.connect(cluster_config([server.url]), name=f"operator-{server.name}")
               for server in nats_cluster.servers]
    try:
        registries = [CameraRegistry(client) for client in clients]
        registries[0].ensure()
        for i in range(READ_YOUR_WRITES_TRIALS):
            leader = leader_of(clients[0], f"KV_{config.leases.cameras_bucket}", nats_cluster.servers)
            followers = [s for s in nats_cluster.servers if s is not leader]
            paused, reader = followers[i % 2], nats_cluster.servers.index(followers[(i // 2) % 2])
            name = f"cam{i}"
            os.kill(paused.pid, signal.SIGSTOP)
            try:
                registries[nats_cluster.servers.index(leader)].add(name, f"rtsp://127.0.0.1:8554/{name}")
            finally:
                os.kill(paused.pid, signal.SIGCONT)
            assert name in {row.camera.name for row in registries[reader].status()}, f"trial {i}"
            assert name in {camera.name for camera in registries[reader].cameras()}, f"trial {i}"
            registries[nats_cluster.servers.index(leader)].remove(name)
    finally:
        for client in clients:
            client.close()
    behind = sum("filled in from the leader" in r.getMessage() for r in caplog.records)
    print(f"read your writes: {READ_YOUR_WRITES_TRIALS} adds listed at once through another server; the watch "
          f"of {behind} bucket reads ended short of the bucket's last revision (filled in from its leader)")


def test_operator_reads_wait_out_the_election_after_the_cameras_leader_dies(nats_cluster):
    """`fleet status`, `fleet list` and `fleet nodes` right after the SIGKILL of the server that led the
    cameras bucket: no FleetUnavailable, the reads wait for the new leader (as add/remove do)."""
    config = cluster_config(nats_cluster.urls)
    with FleetClient.connect(config, name="admin") as admin:
        registry = CameraRegistry(admin)
        registry.ensure()
        leader = leader_of(admin, f"KV_{config.leases.cameras_bucket}", nats_cluster.servers)
        other = next(s for s in nats_cluster.servers if s is not leader)
        with FleetClient.connect(cluster_config([other.url]), name="operator") as operator_client:
            operator = CameraRegistry(operator_client)
            operator.add("cam0", "rtsp://127.0.0.1:8554/cam0")
            operator.add("cam1", "rtsp://127.0.0.1:8554/cam1")
            leader.kill()
            killed = time.monotonic()
            # the first read waits out the election; the others find a leader (each takes the same way)
            assert [(row.camera.name, row.lease) for row in operator.status()] == [("cam0", None), ("cam1", None)]
            answered = time.monotonic()
            assert [camera.name for camera in operator.cameras()] == ["cam0", "cam1"]
            assert operator.nodes() == []
            operator.ensure()
            print(f"fleet status after the SIGKILL of the cameras bucket's leader: answered "
                  f"{answered - killed:.2f} s after it")


def test_a_read_ends_where_the_latest_revision_expired_with_its_marker(nats_server):
    """The bucket's last revision can be gone (an entry that expired, then its expiry marker): a read
    waits for no watch to reach it."""
    config = FleetConfig(nats=NatsConfig(urls=(nats_server.url,), reconnect_wait_s=0.2, request_timeout_s=2.0),
                         leases=LeaseConfig(ttl_s=1.0, renew_interval_s=0.4))
    with FleetClient.connect(config, name="admin") as admin:
        registry = CameraRegistry(admin)
        registry.ensure()
        registry.add("cam0", "rtsp://127.0.0.1:8554/cam0")
        node = LeaseManager(admin, "host-a", capacity=1)
        node.start()
        first_event(node, "acquired", "cam0", timeout_s=5)
        assert [info.name for info in registry.nodes()] == ["host-a"]
        node.stop(release=False)  # as a crash: its presence and its lease expire, then their markers

        def expired_and_unmarked() -> bool:
            states = [admin.run(admin.js.stream_info(f"KV_{bucket}")).state
                      for bucket in (config.leases.nodes_bucket, config.leases.leases_bucket)]
            return all(state.messages == 0 and state.last_seq > 0 for state in states)

        first_value(expired_and_unmarked, 30, "the node's presence and lease expired, and their markers")
        assert registry.nodes() == []
        assert [(row.camera.name, row.lease) for row in registry.status()] == [("cam0", None)]


def test_when_the_leases_leader_dies_every_camera_returns_to_its_node(nats_cluster, caplog):
    """A raft election can take longer than the lease TTL: leases lapse, and each node takes its own back
    (none lost: the cameras run on)."""
    config = cluster_config(nats_cluster.urls)
    with FleetClient.connect(config, name="admin") as admin:
        registry = CameraRegistry(admin)
        registry.ensure()
        managers = []
        caplog.set_level(logging.INFO, logger="maskstream.pipeline.fleet.leases")
        for name in ("host-a", "host-b"):
            client = FleetClient.connect(config, name=name)
            managers.append(LeaseManager(client, name, capacity=3))
            managers[-1].start()
        try:
            for i in range(4):
                registry.add(f"cam{i}", f"rtsp://127.0.0.1:8554/cam{i}")
            wait_for(lambda: sum(len(m.held()) for m in managers) == 4, timeout_s=10, what="4 cameras held")
            before = {name: m.node for m in managers for name in m.held()}
            leader = leader_of(admin, f"KV_{config.leases.leases_bucket}", nats_cluster.servers)
            killed, killed_wall = time.monotonic(), time.time()
            leader.kill()

            def back_home() -> bool:
                # every lease written after the kill (renewed or claimed anew), each by the node that had it
                try:
                    rows = registry.status()
                except FleetUnavailable:  # the bucket is electing its leader
                    return False
                return ({row.camera.name: row.lease.node for row in rows if row.lease} == before
                        and all(row.lease.renewed_at > killed_wall for row in rows)
                        and {name: m.node for m in managers for name in m.held()} == before)

            back = wait_for(back_home, timeout_s=config.leases.ttl_s + 25, what="every camera held again by its node")
            lost = sorted(e.camera.name for m in managers for e in m.events() if e.kind == "lost")
            assert lost == []  # the lapsed leases were taken back, the cameras ran on throughout
        finally:
            for m in managers:
                m.stop()
                m.client.close()
    taken_back = sum("back after its lease lapsed" in r.getMessage() for r in caplog.records)
    print(f"leases leader SIGKILL: no lease lost, {taken_back} lapsed and taken back, all 4 cameras renewed by "
          f"their nodes {back - killed:.1f} s after the kill")


def test_a_node_whose_server_answers_but_cannot_write_keeps_its_cameras_for_the_grace_then_stops(nats_cluster):
    """The other side of the rule above, and the partition risk docs/fleet.md names: the node's server is cut
    from the rest of the cluster (here the other two are SIGKILLed: no quorum, no leader, no lease written)
    but still answers the node's probes. The node cannot tell that from a leader election: it keeps its
    cameras past ttl_s for election_grace_s, then gives them up: the overlap with the other side's nodes,
    which claim them after ttl_s, is up to election_grace_s. Short settings: this is the mechanism."""
    leases = LeaseConfig(ttl_s=2.0, renew_interval_s=0.5, claim_grace_s=1.0, election_grace_s=4.0)
    config = replace(cluster_config(nats_cluster.urls), leases=leases)
    with FleetClient.connect(config, name="admin") as admin:
        registry = CameraRegistry(admin)
        registry.ensure()
        # a follower of the leases bucket (its leader, left alone, may still refuse a renewal with the
        # expiry it applied itself: the camera is then given up at ttl_s, the earlier and safe side)
        leader = leader_of(admin, f"KV_{leases.leases_bucket}", nats_cluster.servers)
        remaining = next(s for s in nats_cluster.servers if s is not leader)
        others = [s for s in nats_cluster.servers if s is not remaining]
        with FleetClient.connect(replace(config, nats=replace(config.nats, urls=(remaining.url,))),
                                 name="host-a") as client:
            node = LeaseManager(client, "host-a", capacity=2)
            node.start()
            try:
                registry.add("cam0", "rtsp://127.0.0.1:8554/cam0")
                registry.add("cam1", "rtsp://127.0.0.1:8554/cam1")
                wait_for(lambda: len(node.held()) == 2, timeout_s=10, what="both cameras held")
                for server in others:
                    server.kill()
                cut = time.monotonic()
                lost = {name: first_event(node, "lost", name, leases.ttl_s + leases.election_grace_s + 10).at - cut
                        for name in ("cam0", "cam1")}
                assert client.state().connected
            finally:
                node.stop(release=False)
    print("its server answering, the leases bucket without a leader: given up " +
          ", ".join(f"{name} {t:.2f} s" for name, t in lost.items()) + " after the other servers' SIGKILL")
    # kept through the grace (its last renewal at most one period before the kill), given up at its end
    assert min(lost.values()) >= leases.ttl_s + leases.election_grace_s - leases.renew_interval_s, lost
    assert max(lost.values()) <= leases.ttl_s + leases.election_grace_s + LeaseManager.check_interval(leases) + \
        leases.renew_interval_s, lost



def test_a_node_whose_link_to_its_server_is_pulled_moves_to_another_server(nats_cluster, caplog):
    """A node reaches server A only through a relay (A advertises the relay's address, so the node learns
    no other way to it) and knows B and C directly; another node, with room, is on B and C. The relay
    then forwards nothing (a pulled cable, a dead switch port, a NAT that dropped the flow: TCP sees
    nothing wrong). The node's pings go unanswered, and once more than nats.max_outstanding_pings of them
    have, it leaves A for B or C: within nats.stale_after_s of the cut, plus at most one try at the relay
    (nats-py shuffles its servers before it reconnects; the relay accepts and says nothing for
    nats.connect_timeout_s), plus one connection's start. Its cameras: each is kept (renewed, or taken
    back after its lease lapsed) or claimed by the other node, never run by both (the cut-off node gives
    it up first, give or take one check); which, and when, is measured. Default settings but the URLs."""
    a, b, c = nats_cluster.servers
    caplog.set_level(logging.INFO, logger="maskstream.pipeline.fleet")
    with Relay(a.port) as relay:
        a.stop()
        a.extra = ("--client_advertise", f"127.0.0.1:{relay.port}")
        a.start()
        nats_cluster.wait_healthy()
        nats_config = NatsConfig(urls=(relay.url, b.url, c.url))
        config = FleetConfig(nats=nats_config, replicas=3)
        leases = config.leases
        with FleetClient.connect(cluster_config([b.url, c.url]), name="admin") as admin:
            registry = CameraRegistry(admin)
            registry.ensure()
            for _ in range(30):  # nats-py shuffles the URLs: the node must be on A, through the relay
                client = FleetClient.connect(config, name="cut")
                if client.state().server == relay.url:
                    break
                client.close()
            else:
                raise AssertionError("the node never connected through the relay in 30 tries")
            with client, FleetClient.connect(cluster_config([b.url, c.url]), name="steady") as steady_client:
                cut = LeaseManager(client, "cut", capacity=2)
                steady = LeaseManager(steady_client, "steady", capacity=4)
                cut.start()
                steady.start()
                try:
                    theirs = two_cameras_each(registry, cut, steady)
                    for manager in (cut, steady):
                        _seen.pop(manager, None)
                        manager.events()
                    caplog.clear()
                    cut_at = time.monotonic()
                    relay.blackhole()
                    bound = nats_config.stale_after_s + nats_config.connect_timeout_s + CONNECTION_START_S
                    moved = wait_for(lambda: client.state().server in (b.url, c.url), bound + 60,
                                     "the node on another server") - cut_at
                    # each camera's fate is settled by ttl_s + election_grace_s (kept at most that long unrenewed)
                    time.sleep(max(0.0, cut_at + leases.ttl_s + leases.election_grace_s + 2 - time.monotonic()))
                    events = [*cut.events(), *steady.events()]
                    lost = {e.camera.name: e.at - cut_at for e in events if e.kind == "lost"}
                    claimed = {e.camera.name: e.at - cut_at for e in events if e.kind == "acquired"}
                    taken_back = sorted(name for name in theirs if any(
                        f"took {name} back" in r.getMessage() and "node cut:" in r.getMessage()
                        for r in caplog.records))
                    rows = {row.camera.name: row.lease for row in registry.status()}
                    print(f"pulled link: the node on {client.state().server} {moved:.2f} s after the cut (bound "
                          f"{bound:g} s: a ping every {nats_config.ping_interval_s:g} s, "
                          f"{nats_config.max_outstanding_pings} outstanding); its cameras: " + ", ".join(
                              f"{name} " + (f"lost {lost[name]:.2f} s, claimed by the other {claimed[name]:.2f} s"
                                            if name in claimed else "taken back" if name in taken_back else "kept")
                              for name in theirs))
                    assert moved <= bound, moved
                    assert client.state().reconnects == 1
                    # on its new server before the earliest deadline of its leases (ttl_s after a renewal sent
                    # up to one and a half periods before the cut), with time for a probe and a renewal: kept
                    if moved <= leases.ttl_s - 1.5 * leases.renew_interval_s - 2 * LeaseManager.check_interval(leases):
                        assert claimed == {} and lost == {}, (moved, lost, claimed)
                    for name in theirs:
                        if name in claimed:  # given up first (give or take one check), then claimed
                            assert lost[name] <= claimed[name] + LeaseManager.check_interval(leases), (lost, claimed)
                            assert rows[name] is not None and rows[name].node == "steady"
                        else:  # never given up, renewed by the cut-off node on its new server
                            assert name not in lost and name in cut.held(), (lost, claimed)
                            assert rows[name] is not None and rows[name].node == "cut"
                    assert set(claimed) <= set(theirs) and set(lost) == set(claimed)
                    assert len(cut.held()) + len(steady.held()) == 4
                    assert all(time.time() - lease.renewed_at < 2 * leases.renew_interval_s + 1
                               for lease in rows.values() if lease is not None)
                    # the cut-off node is in the fleet again, on its new server
                    wait_for(lambda: any(info.name == "cut" and info.renewed_at > time.time() - 2 *
                                         leases.renew_interval_s for info in registry.nodes()), leases.ttl_s,
                             "the node present")
                finally:
                    cut.stop()
                    steady.stop()


def thread_cpu_s(thread) -> float:
    """CPU time a thread of this process has used (user + system), from /proc."""
    fields = open(f"/proc/self/task/{thread.native_id}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_node_that_holds_no_camera_does_not_spin(registry, nodes):
    """A node with nothing to hold (a jobs-only node, or every camera elsewhere) waits on its timers: its
    client's loop thread uses a small share of one core, where a watchdog that never advanced its next
    probe without cameras slept 0 s in a loop and took the whole core."""
    idle = nodes("idle", 2)  # started: it has its view of the fleet
    thread = idle.client._thread
    before, started = thread_cpu_s(thread), time.monotonic()
    time.sleep(3.0)
    used, wall = thread_cpu_s(thread) - before, time.monotonic() - started
    assert used < 0.25 * wall, f"the lease manager's loop used {used:.2f} s of CPU in {wall:.1f} s holding nothing"
    print(f"idle lease manager: {used:.3f} s of CPU in {wall:.1f} s")
