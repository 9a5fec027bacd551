"""Results on NATS against real servers: replay from a sequence, de-duplication, a server's death."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import numpy as np
import pytest
from maskstream.pipeline.client import SeqTracker
from maskstream.pipeline.fleet.config import FleetConfig, JobsConfig, LeaseConfig, NatsConfig, ResultsConfig
from maskstream.pipeline.fleet.connection import FleetClient, FleetUnavailable
from maskstream.pipeline.fleet.jobs import ensure_jobs
from maskstream.pipeline.fleet.leases import ensure_lease_buckets
from maskstream.pipeline.fleet.results import (
    ResultPublisher,
    ResultSubscriber,
    Superseded,
    ensure_results_stream,
    subject_of,
)
from maskstream.pipeline.fleet.runs import PipelineRun, RunSpec
from maskstream.pipeline.run_config import RunConfig
from maskstream.pipeline.runtime.messages import Detections, EndOfStream

from tests.fleet_nodes import check_every_frame_published_or_counted
from tests.make_detections import end_of_stream, make_detections
from tests.nats_cluster import NatsCluster


def fleet_config(urls, replicas=1):
    return FleetConfig(nats=NatsConfig(urls=tuple(urls), reconnect_wait_s=0.2, request_timeout_s=2.0),
                       replicas=replicas)


@pytest.fixture
def client(nats_server):
    with FleetClient.connect(fleet_config([nats_server.url]), name="test") as c:
        ensure_results_stream(c)
        yield c


def test_a_subscriber_started_while_the_server_stalls_waits_for_it(client, nats_server):
    """Its consumer's creation goes unanswered for longer than nats.request_timeout_s (a server
    restarting, a stream electing its leader): the subscriber's start asks again, as a publish does."""
    pub = ResultPublisher(client)
    pub.publish(make_detections("cam0", 0)[0])
    os.kill(nats_server.pid, signal.SIGSTOP)
    resume = threading.Timer(2 * client.config.nats.request_timeout_s + 0.5, os.kill,
                             (nats_server.pid, signal.SIGCONT))
    resume.start()
    try:
        with ResultSubscriber.open(client, streams=["cam0"], from_seq=1, timeout_s=10) as sub:
            assert sub.recv().header.seq == 0
    finally:
        resume.cancel()
        os.kill(nats_server.pid, signal.SIGCONT)


def same(a, b):
    assert type(a) is type(b) and a.header == b.header
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, f.name


def test_published_results_come_back_as_the_subscriber_objects(client):
    pub = ResultPublisher(client)
    sent = {sid: [make_detections(sid, i)[0] for i in range(5)] + [end_of_stream(sid, 5)]
            for sid in ("cam0", "clip.v2", "lobby door")}
    for i in range(6):  # interleaved, as a pipeline publishes several streams
        for sid in sent:
            pub.publish(sent[sid][i])
    assert pub.last_seq("clip.v2") == 5 and pub.last_seq("nowhere") is None

    with ResultSubscriber.open(client, streams=["clip.v2", "lobby door"], from_seq=1, timeout_s=5) as sub:
        got = list(sub)  # stops after both EndOfStreams
    assert [m.header.stream_id for m in got] == ["clip.v2", "lobby door"] * 6
    for sid in ("clip.v2", "lobby door"):
        mine = [m for m in got if m.header.stream_id == sid]
        for a, b in zip(mine, sent[sid]):
            same(a, b)
        assert isinstance(mine[-1], EndOfStream)
        assert sub.stats[sid].received == 6 and sub.stats[sid].missed == 0 and sub.stats[sid].ended

    with ResultSubscriber.open(client, streams=["c*"], from_seq=1, timeout_s=1) as sub:  # a pattern
        ids = {sub.recv().header.stream_id for _ in range(12)}
        with pytest.raises(TimeoutError):
            sub.recv(timeout_s=0.5)
    assert ids == {"cam0", "clip.v2"}


def test_a_result_published_twice_is_stored_once(client):
    pub = ResultPublisher(client)
    det, _ = make_detections("cam0", 7)
    first = pub.publish(det)
    again = pub.publish(det)  # a re-run job publishing the same frame
    assert not first.duplicate and again.duplicate and again.stream_seq == first.stream_seq
    moved = pub.publish(det, epoch="r2")  # a camera that restarted elsewhere: a new run, not a duplicate
    assert not moved.duplicate and moved.stream_seq == first.stream_seq + 1
    info = client.run(client.js.stream_info(client.config.results.stream, subjects_filter=">"))
    assert info.state.messages == 2
    assert info.state.subjects == {subject_of(client.config.results.subject_prefix, "cam0"): 2}


def test_a_subscriber_away_for_a_while_replays_what_it_missed(client):
    pub = ResultPublisher(client)
    cfg = client.config
    for i in range(40):
        pub.publish(make_detections("cam0", i)[0])
    sub = ResultSubscriber.connect(cfg, streams=["cam0"], from_seq=1, timeout_s=5)
    seqs = [sub.recv().header.seq for _ in range(25)]
    resume = sub.last_stream_seq + 1
    sub.close()  # gone: its connection closed, its consumer left behind to expire

    for i in range(40, 100):  # published while nobody reads
        pub.publish(make_detections("cam0", i)[0])
    pub.publish(end_of_stream("cam0", 100))

    with ResultSubscriber.connect(cfg, streams=["cam0"], from_seq=resume, timeout_s=5) as sub:
        later = list(sub)
    seqs += [m.header.seq for m in later if isinstance(m, Detections)]
    assert seqs == list(range(100))  # no gap, no duplicate, in order
    assert isinstance(later[-1], EndOfStream) and later[-1].header.seq == 100


def test_a_subscriber_started_now_sees_only_new_results(client):
    pub = ResultPublisher(client)
    pub.publish(make_detections("cam0", 0)[0])
    with ResultSubscriber.open(client, streams=["cam0"], timeout_s=5) as sub:
        with pytest.raises(TimeoutError):
            sub.recv(timeout_s=0.3)
        pub.publish(make_detections("cam0", 1)[0])
        assert sub.recv().header.seq == 1


def test_publishing_and_reading_go_on_when_a_server_is_sigkilled(nats_cluster):
    cfg = fleet_config(nats_cluster.urls, replicas=3)
    total = 300
    with FleetClient.connect(cfg, name="publisher") as client:
        ensure_results_stream(client)
        info = client.run(client.js.stream_info(cfg.results.stream))
        leader = next(s for s in nats_cluster.servers if s.name == info.cluster.leader)
        pub = ResultPublisher(client)
        received: list = []
        failures: list = []
        recreated: list = []

        def read() -> None:
            try:
                with ResultSubscriber.connect(cfg, streams=["cam0"], from_seq=1, timeout_s=60) as sub:
                    received.extend(sub)
                    recreated.append(sub.recreated)
            except Exception as exc:  # reported by the assertion below
                failures.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        stored = []
        killed_at = None
        slowest = 0.0
        for i in range(total):
            if i == total // 3:
                leader.kill()  # the results stream's leader: the other two elect a new one
                killed_at = time.monotonic()
            began = time.monotonic()
            stored.append(pub.publish(make_detections("cam0", i)[0]))
            slowest = max(slowest, time.monotonic() - began)
            time.sleep(0.005)
        stored.append(pub.publish(end_of_stream("cam0", total)))
        outage = time.monotonic() - killed_at
        reader.join(90)
        assert not reader.is_alive() and not failures, failures

        # every result stored once, read once, in order, through the election
        assert not any(s.duplicate for s in stored)
        assert [m.header.seq for m in received] == list(range(total + 1))
        tracker = SeqTracker()
        assert all(tracker.observe(m) == 0 for m in received)
        after = client.run(client.js.stream_info(cfg.results.stream))
        assert after.state.messages == total + 1 and after.cluster.leader != leader.name
        print(f"server SIGKILL: {total} results stored and read through it; longest publish {slowest:.2f} s, "
              f"{outage:.1f} s from the kill to the end; the reader recreated its consumer {recreated[0]} time(s)")

    leader.start()  # the killed server comes back and catches up
    nats_cluster.wait_healthy()


def test_a_camera_result_not_stored_in_time_is_stored_once_the_server_is_back(nats_server):
    cfg = dataclasses.replace(fleet_config([nats_server.url]), results=ResultsConfig(publish_timeout_s=1.0))
    with FleetClient.connect(cfg, name="node-a") as client:
        ensure_results_stream(client)
        # a camera's forwarding, given the pipeline's results as its thread would be (no pipeline runs)
        run = PipelineRun(RunSpec("camera", "cam0", RunConfig(), epoch="7"), ResultPublisher(client))
        assert run._publish(make_detections("cam0", 0)[0]) is None
        nats_server.stop()  # the server away for longer than publish_timeout_s: the camera goes on
        began = time.monotonic()
        assert run._publish(make_detections("cam0", 1)[0]) is None
        assert time.monotonic() - began < 5 and "result 1 not stored" in run.status().last_error
        nats_server.start()
        assert run._publish(make_detections("cam0", 2)[0]) is None
        run._end_camera("camera removed")
    with ResultSubscriber.connect(cfg, streams=["cam0"], from_seq=1, timeout_s=10) as sub:
        got = list(sub)
    # the result the server did not take in time is stored once it is back: in order, once
    assert [m.header.seq for m in got] == [0, 1, 2, 3] and isinstance(got[-1], EndOfStream)
    check_every_frame_published_or_counted([(0.0, m) for m in got])


def test_ensure_creates_once_and_brings_existing_limits_to_the_config(nats_server):
    base = fleet_config([nats_server.url])
    with FleetClient.connect(base) as client:
        for _ in range(2):  # every node ensures at start: the second time changes nothing
            ensure_results_stream(client)
            ensure_lease_buckets(client)
            ensure_jobs(client)
    changed = dataclasses.replace(
        base, leases=LeaseConfig(ttl_s=8.0), results=ResultsConfig(max_age_s=3600.0, duplicate_window_s=60.0),
        jobs=JobsConfig(ack_wait_s=60.0, progress_interval_s=5.0, max_deliver=2))
    with FleetClient.connect(changed) as client:
        ensure_results_stream(client)
        ensure_lease_buckets(client)
        ensure_jobs(client)
        results = client.run(client.js.stream_info(changed.results.stream)).config
        leases = client.run(client.js.stream_info(f"KV_{changed.leases.leases_bucket}")).config
        consumer = client.run(client.js.consumer_info(changed.jobs.stream, changed.jobs.consumer)).config
    assert (results.max_age, results.duplicate_window) == (3600.0, 60.0)
    assert (leases.max_age, leases.subject_delete_marker_ttl) == (8.0, 8.0)
    assert (consumer.ack_wait, consumer.max_deliver) == (60.0, 2)


def test_streams_and_buckets_made_before_the_cluster_has_every_server_wait_for_it(tmp_path):
    """replicas 3 on a cluster whose third server has not joined yet (a fleet's first start, its servers
    coming up one by one; or a loaded host where the meta leader has not counted one in): JetStream has no
    servers to place a new stream's replicas on. A node's start makes its streams and buckets then: it waits
    for the server, up to leases.change_timeout_s, instead of failing at once; past that, the error says
    what is missing."""
    cluster = NatsCluster(tmp_path / "late")
    first, late = cluster.servers[:2], cluster.servers[2]
    try:
        for server in first:
            server.start(wait=False)
        for server in first:
            server.wait_healthy()
        short = FleetConfig(nats=NatsConfig(urls=tuple(s.url for s in first), reconnect_wait_s=0.2), replicas=3,
                            leases=LeaseConfig(change_timeout_s=2.0))
        with FleetClient.connect(short, name="impatient") as client:
            with pytest.raises(FleetUnavailable, match=r"bucket maskstream_\w+: JetStream found no servers for its 3 "
                                                       r"replica\(s\) within 2 s .*is a server of the cluster down"):
                ensure_lease_buckets(client)
        patient = dataclasses.replace(short, leases=LeaseConfig(change_timeout_s=60.0))
        with FleetClient.connect(patient, name="patient") as client:
            joins = threading.Timer(1.0, late.start)
            joins.start()
            try:
                started = time.monotonic()
                ensure_lease_buckets(client)
                ensure_results_stream(client)
                ensure_jobs(client)
                waited = time.monotonic() - started
            finally:
                joins.join()
            info = client.run(client.js.stream_info(client.config.results.stream))
            assert info.config.num_replicas == 3 and info.cluster is not None and info.cluster.leader
    finally:
        cluster.stop()
    assert waited > 1.0  # made once the third server was there, not before
    print(f"streams and buckets made {waited:.1f} s after the first try, the third server started after 1 s")


def test_a_publish_after_a_known_result_stores_once_and_refuses_another_writers_place(client):
    """publish(after=): stored only where the writer expects the stream's last result; its own earlier
    try, already stored, is a duplicate (the server checks the expected sequence before the message id);
    another writer's place is Superseded, the duplicate window or not."""
    publisher = ResultPublisher(client)
    first = publisher.publish(make_detections("job-1", 0)[0], after=0)
    again = publisher.publish(make_detections("job-1", 0)[0], after=0)  # a retry whose first try was stored
    assert (again.stream_seq, again.duplicate) == (first.stream_seq, True) and not first.duplicate
    second = publisher.publish(make_detections("job-1", 1)[0], after=first.stream_seq)
    with pytest.raises(Superseded, match="job-1"):  # a writer that knows only seq 0 stored
        publisher.publish(make_detections("job-1", 2)[0], after=first.stream_seq)
    with pytest.raises(Superseded):
        publisher.publish(make_detections("job-1", 0)[0], after=0)  # a writer that started before anything
    assert publisher.last_stored("job-1")[0] == second.stream_seq and publisher.last_seq("job-1") == 1
    assert publisher.publish(make_detections("job-2", 0)[0], after=0).stream_seq > second.stream_seq  # per stream
