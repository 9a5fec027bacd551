"""Offline jobs against a real server: submit, take, finish, fail, and redelivery after a SIGKILL."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from dataclasses import replace

import pytest
from maskstream.pipeline.config import dump_config
from maskstream.pipeline.fleet.config import FleetConfig, JobsConfig, LeaseConfig, NatsConfig
from maskstream.pipeline.fleet.connection import FleetClient, wait_for
from maskstream.pipeline.fleet.jobs import JobNotFound, JobQueue, JobWorker
from maskstream.pipeline.fleet.leases import CameraRegistry, LeaseManager
from maskstream.pipeline.fleet.results import ResultPublisher, ResultSubscriber, Superseded, ensure_results_stream
from maskstream.pipeline.fleet.runs import hand_back
from maskstream.pipeline.runtime.messages import EndOfStream

from tests.fleet_agent import Agent
from tests.make_detections import end_of_stream, make_detections
from tests.net_fault import Relay

ACK_WAIT_S = 3.0


@pytest.fixture
def jobs_config(nats_server):
    return FleetConfig(nats=NatsConfig(urls=(nats_server.url,), reconnect_wait_s=0.2, request_timeout_s=2.0),
                       jobs=JobsConfig(ack_wait_s=ACK_WAIT_S, progress_interval_s=1.0, max_deliver=3))


@pytest.fixture
def queue(jobs_config):
    with FleetClient.connect(jobs_config, name="submitter") as client:
        q = JobQueue(client)
        q.ensure()
        ensure_results_stream(client)
        yield q


def inputs(tmp_path, n):
    paths = []
    for i in range(n):
        path = tmp_path / f"clip{i}.mp4"
        path.write_bytes(b"not read by these tests")
        paths.append(str(path))
    return paths


def test_submit_take_done_and_the_states_on_the_way(queue, jobs_config, tmp_path):
    files = inputs(tmp_path, 2)
    ids = queue.submit([*files, "rtsp://127.0.0.1:8554/archive"])
    assert [s.state for s in queue.jobs()] == ["queued"] * 3
    assert [s.input for s in queue.jobs()] == [*files, "rtsp://127.0.0.1:8554/archive"]

    with FleetClient.connect(jobs_config, name="node-a") as node:
        worker = JobWorker(node, "node-a")
        job = worker.take(timeout_s=5)
        assert job is not None and job.job_id == ids[0] and job.attempt == 1 and not job.redelivered
        assert job.request.stream_id == ids[0] and job.job_id.startswith("clip0-")
        running = queue.get(ids[0])
        assert (running.state, running.node, running.attempt) == ("running", "node-a", 1)
        job.done()
        assert queue.get(ids[0]).state == "done"

        second = worker.take(timeout_s=5)
        second.fail("corrupt file: moov atom not found")
        failed = queue.get(ids[1])
        assert (failed.state, failed.error) == ("failed", "corrupt file: moov atom not found")

        third = worker.take(timeout_s=5)
        assert third.request.input == "rtsp://127.0.0.1:8554/archive"
        third.done()
        assert worker.take(timeout_s=0.5) is None  # done, failed (terminated) and done: nothing comes back
        worker.close()
    with pytest.raises(JobNotFound):
        queue.get("nope")
    with pytest.raises(ValueError, match="no such file"):
        queue.submit([str(tmp_path / "missing.mp4")])


def test_a_job_held_longer_than_ack_wait_is_not_redelivered(queue, jobs_config, tmp_path):
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    with FleetClient.connect(jobs_config, name="a") as a, FleetClient.connect(jobs_config, name="b") as b:
        slow, other = JobWorker(a, "a"), JobWorker(b, "b")
        job = slow.take(timeout_s=5)
        assert job is not None and job.job_id == job_id
        # the heartbeats keep it: another worker waiting two ack waits gets nothing
        assert other.take(timeout_s=2 * ACK_WAIT_S) is None
        job.done()
        assert queue.get(job_id).state == "done"
        slow.close()
        other.close()


def test_a_job_whose_node_is_sigkilled_is_redelivered_and_its_results_stored_once(queue, jobs_config, tmp_path):
    """The dead node published part of the job's results; the re-run publishes all: each frame is stored once."""
    frames, partial = 30, 12
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    path = tmp_path / "fleet.yaml"
    path.write_text(dump_config(jobs_config))
    agent = Agent(str(path), "job", "doomed", str(partial))
    try:
        agent.expect("READY", timeout_s=30)
        assert agent.expect("TOOK", timeout_s=15).split()[1:] == [job_id, "1"]
        agent.expect("PUBLISHED", timeout_s=15)
        assert queue.get(job_id).node == "doomed"
        with FleetClient.connect(jobs_config, name="survivor") as client:
            worker = JobWorker(client, "survivor")
            assert worker.take(timeout_s=0.2) is None  # held by the live agent
            killed = agent.kill()
            job = worker.take(timeout_s=ACK_WAIT_S + 10)
            redelivered_after = time.monotonic() - killed
            assert job is not None and job.job_id == job_id and job.attempt == 2 and job.redelivered
            state = queue.get(job_id)
            assert (state.state, state.node, state.attempt) == ("running", "survivor", 2)

            publisher = ResultPublisher(client)
            assert publisher.last_seq(job.request.stream_id) == partial - 1  # where the dead node got to
            stored = [publisher.publish(make_detections(job.request.stream_id, seq)[0]) for seq in range(frames)]
            stored.append(publisher.publish(end_of_stream(job.request.stream_id, frames)))
            job.done()  # after every result is durable
            assert queue.get(job_id).state == "done"
            assert [s.duplicate for s in stored] == [True] * partial + [False] * (frames - partial + 1)

            with ResultSubscriber.open(client, streams=[job.request.stream_id], from_seq=1, timeout_s=5) as sub:
                seqs = [m.header.seq for m in sub]
            assert seqs == list(range(frames + 1))  # each frame once, in order, then the EndOfStream
            worker.close()
    finally:
        agent.close()
    # ack wait after the last heartbeat (at most progress_interval_s before the kill), plus one fetch
    assert redelivered_after < ACK_WAIT_S + 2.0
    print(f"job redelivered {redelivered_after:.2f} s after its node's SIGKILL (ack_wait {ACK_WAIT_S} s)")



def reclaim_config(jobs_config):
    """Jobs left to the server come back after 30 s here; a departed node's are handed back within seconds."""
    return replace(jobs_config, leases=LeaseConfig(ttl_s=2.0, renew_interval_s=0.5, claim_grace_s=1.0),
                   jobs=replace(jobs_config.jobs, ack_wait_s=30.0, status_interval_s=0.5))


def presence_names(config, job_id):
    """Wait until a node's presence names the job (written at the node's tick after it took it)."""
    with FleetClient.connect(config, name="reader") as client:
        registry = CameraRegistry(client)
        wait_for(lambda: any(job_id in info.jobs for info in registry.nodes()), 10, f"a presence naming {job_id}")


def sigkill_a_job_holder(path, name, job_id, config):
    """A node process `name` (tests/fleet_agent.py) takes the job; once its presence names it, SIGKILL.
    Returns time.monotonic() right after the kill."""
    agent = Agent(str(path), "jobnode", name)
    try:
        agent.expect("READY", timeout_s=30)
        assert agent.expect("TOOK", timeout_s=15).split()[1:] == [job_id, "1"]
        presence_names(config, job_id)
        return agent.kill()
    finally:
        agent.close()


@contextlib.contextmanager
def node_start(config, name):
    """A node's lease manager and job worker, as `maskstream node` starts them (one instance): (manager, worker)."""
    with FleetClient.connect(config, name=name) as client:
        manager = LeaseManager(client, name, 0)
        manager.start()
        worker = JobWorker(client, name, manager.instance)
        try:
            yield manager, worker
        finally:
            worker.close()
            manager.stop()


def take_reclaiming(worker, manager, timeout_s, answered_for=None, taken_elsewhere=None):
    """A node's loop, as far as jobs go: hand back the departed nodes' jobs, take one. (job, handed back,
    time.monotonic() when taken). Ends early, with nothing taken, once `taken_elsewhere` is set; sets it
    when it takes one."""
    def turn() -> list[str]:
        answered = manager.answered_for() if answered_for is None else answered_for
        return worker.reclaim(manager.departed(), manager.live_nodes(), answered)

    handed: list[str] = []
    job, taken_at = None, None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (taken_elsewhere is not None and taken_elsewhere.is_set()):
        handed += turn()
        job = worker.take(timeout_s=0.1)
        if job is not None:
            taken_at = time.monotonic()
            if taken_elsewhere is not None:
                taken_elsewhere.set()
            break
    settled = time.monotonic() + 1.0  # a check that handed a job back reports at a later turn
    while time.monotonic() < settled:
        handed += turn()
        time.sleep(0.05)
    return job, handed, taken_at


def test_a_sigkilled_nodes_job_is_handed_back_by_one_survivor_within_the_lease_ttl(queue, jobs_config, tmp_path):
    """The node holding a job is SIGKILLed: its presence expires after ttl_s and the survivors, which both see
    it go, hand the job back at once through its delivery's acknowledgement subject, instead of leaving it to
    ack_wait_s. One of them does (compare-and-set on the state), and the server delivers it once more: one
    attempt 2, no attempt 3."""
    config = reclaim_config(jobs_config)
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    path = tmp_path / "fleet.yaml"
    path.write_text(dump_config(config))
    agent = Agent(str(path), "jobnode", "doomed")
    with FleetClient.connect(config, name="s1") as c1, FleetClient.connect(config, name="s2") as c2:
        managers = [LeaseManager(c1, "s1", 0), LeaseManager(c2, "s2", 0)]
        for manager in managers:
            manager.start()
        workers = [JobWorker(c, m.node, m.instance) for c, m in zip((c1, c2), managers)]
        try:
            agent.expect("READY", timeout_s=30)
            assert agent.expect("TOOK", timeout_s=15).split()[1:] == [job_id, "1"]
            held = queue.get(job_id)
            assert (held.node, held.state) == ("doomed", "running") and held.reply.startswith("$JS.ACK.")
            presence_names(config, job_id)
            wait_for(lambda: "doomed" in managers[0].live_nodes() and "doomed" in managers[1].live_nodes(), 10,
                     "the holder in both survivors' views")
            killed = agent.kill()
            one_took = threading.Event()  # the other stops looking then (a third delivery is looked for below)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                taken = list(pool.map(lambda i: take_reclaiming(workers[i], managers[i], 20.0,
                                                                taken_elsewhere=one_took), range(2)))
            jobs = [job for job, _, _ in taken if job is not None]
            assert len(jobs) == 1, taken  # delivered once more, to one of them
            redelivered_after = next(at for _, _, at in taken if at is not None) - killed
            handed = [h for _, h, _ in taken]
            assert sorted(map(len, handed)) == [0, 1] and job_id in handed[0] + handed[1], handed
            (job,) = jobs
            assert job.job_id == job_id and job.attempt == 2
            winner, loser = workers if taken[0][0] is not None else workers[::-1]
            state = queue.get(job_id)
            assert (state.state, state.node, state.attempt, state.instance) == ("running", winner.node, 2,
                                                                                 winner.instance)
            assert loser.take(timeout_s=3.0) is None  # no third delivery beside the second
            assert job.done() and queue.get(job_id).state == "done"
        finally:
            agent.close()
            for worker in workers:
                worker.close()
            for manager in managers:
                manager.stop()
    # the presence's ttl_s after the last renewal, then one check of the state: far under ack_wait_s (30 s)
    assert redelivered_after < 10.0, redelivered_after
    print(f"job handed back and redelivered {redelivered_after:.2f} s after its node's SIGKILL "
          f"(ttl {config.leases.ttl_s} s; ack_wait {config.jobs.ack_wait_s} s)")


def test_a_node_killed_and_started_again_at_once_hands_its_predecessors_job_back(queue, jobs_config, tmp_path):
    """A service manager starts the node again under its name right after the SIGKILL, with no other node in
    the fleet: the restart sees its predecessor's presence replaced by its own and hands that start's job
    back, instead of waiting ack_wait_s for it."""
    config = reclaim_config(jobs_config)
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    path = tmp_path / "fleet.yaml"
    path.write_text(dump_config(config))
    killed = sigkill_a_job_holder(path, "a", job_id, config)
    with node_start(config, "a") as (restart, worker):
        job, handed, taken_at = take_reclaiming(worker, restart, 20.0)
        assert job is not None and job.job_id == job_id and job.attempt == 2 and handed == [job_id]
        state = queue.get(job_id)
        assert (state.node, state.instance) == ("a", restart.instance)
        assert job.done()
    assert taken_at - killed < 10.0  # the predecessor's state silent for ttl_s, far under ack_wait_s (30 s)
    print(f"the restart took its predecessor's job {taken_at - killed:.2f} s after the kill")


def test_a_departed_nodes_job_on_its_last_allowed_delivery_is_failed_not_left_queued(queue, jobs_config, tmp_path):
    """max_deliver 1: the dead holder's attempt was the job's last, the server delivers it no more. The
    restart that sees its predecessor go fails it for good (as a hand-back of a last attempt does) and
    terminates its delivery, rather than leave it `queued` for ever."""
    config = replace(reclaim_config(jobs_config), jobs=replace(reclaim_config(jobs_config).jobs, max_deliver=1))
    path = tmp_path / "fleet.yaml"
    path.write_text(dump_config(config))
    with FleetClient.connect(config, name="setup") as client:  # the consumer's max_deliver to 1
        JobQueue(client).ensure()
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    sigkill_a_job_holder(path, "a", job_id, config)
    with node_start(config, "a") as (restart, worker):
        job, handed, _ = take_reclaiming(worker, restart, 6.0)
        assert job is None and handed == [job_id]
    state = queue.get(job_id)
    assert state.state == "failed", state
    assert state.error == "gave up after 1 attempts, the last: its node a is gone (seen by a)", state


def test_a_holder_whose_presence_lapsed_keeps_its_job_while_it_writes_progress(queue, jobs_config, tmp_path):
    """A presence gone is not enough: a holder whose lease manager stopped (as its presence writes fail in a
    leader election) but which still writes its job's progress keeps the job; once its writes stop too, the
    survivor hands it back, and the holder's late done() acknowledges nothing."""
    config = reclaim_config(jobs_config)
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    with FleetClient.connect(config, name="h") as ch, FleetClient.connect(config, name="s") as cs:
        holder, survivor = LeaseManager(ch, "h", 0), LeaseManager(cs, "s", 0)
        holder.start()
        survivor.start()
        holder_worker = JobWorker(ch, "h", holder.instance)
        worker = JobWorker(cs, "s", survivor.instance)
        try:
            job = holder_worker.take(timeout_s=5)
            assert job is not None and job.job_id == job_id
            holder.set_jobs([job_id])
            wait_for(lambda: "h" in survivor.live_nodes(), 10, "the holder in the survivor's view")
            stop_writing = threading.Event()

            def progress() -> None:
                frames = 0
                while not stop_writing.wait(0.1):
                    frames += 1
                    job.report(frames, None, 10.0)

            writer = threading.Thread(target=progress, daemon=True)
            writer.start()
            holder.stop(release=False)  # its presence lapses after ttl_s; its job goes on
            wait_for(lambda: "h" not in survivor.live_nodes(), 10, "the holder's presence gone")
            taken, handed, _ = take_reclaiming(worker, survivor, 3 * config.leases.ttl_s)
            assert (taken, handed) == (None, [])
            assert (queue.get(job_id).state, queue.get(job_id).node) == ("running", "h")
            stop_writing.set()
            writer.join()
            silent = time.monotonic()
            # a node whose own writes just went unanswered (the election that silenced the holder's) holds off
            taken, handed, _ = take_reclaiming(worker, survivor, 2 * config.leases.ttl_s, answered_for=0.0)
            assert (taken, handed) == (None, []) and queue.get(job_id).state == "running"
            held_off = time.monotonic()
            taken, handed, taken_at = take_reclaiming(worker, survivor, 15.0)
            assert taken is not None and taken.job_id == job_id and taken.attempt == 2 and handed == [job_id]
            assert taken_at - held_off < 3.0  # its state silent for long past ttl_s: at the next check
            print(f"job handed back {taken_at - held_off:.2f} s after the hold-off ended, "
                  f"{taken_at - silent:.2f} s after its holder's state writes stopped (ttl {config.leases.ttl_s} s)")
            assert not job.done()  # the holder's late done(): the later attempt settles the job
            assert taken.done() and queue.get(job_id).state == "done"
        finally:
            holder_worker.close()
            worker.close()
            survivor.stop()
            holder.stop()


class Attempt:
    """One attempt's writer, as a node's job run publishes: each result stored only after the last one it
    knows stored (ResultPublisher's `after`)."""

    def __init__(self, client, job_id):
        self.publisher, self.job_id = ResultPublisher(client), job_id
        last = self.publisher.last_stored(job_id)
        self.stored_through = 0 if last is None else last[0]

    def publish(self, seq, end=False):
        message = end_of_stream(self.job_id, seq) if end else make_detections(self.job_id, seq)[0]
        stored = self.publisher.publish(message, after=self.stored_through)
        self.stored_through = stored.stream_seq
        return stored


@pytest.mark.parametrize("past_window", [False, True], ids=["within-duplicate-window", "past-duplicate-window"])
def test_a_node_cut_off_mid_job_neither_duplicates_results_nor_acks_the_new_attempt(queue, jobs_config, nats_server,
                                                                                   tmp_path, past_window):
    """Node A reaches NATS through a relay that stops forwarding (a pulled cable) mid-job, for longer than
    ack_wait_s: the job goes to node B, which resumes after A's stored results. Healed (within the results
    stream's duplicate window, or after it forgot B's message ids: 1 s here, 120 s by default), A's held
    publish reaches the server late: it must store nothing (no frame twice, none out of order), and A's
    hand-back must not settle B's delivery (were B to die now, the job must come back)."""
    frames, partial, window = 12, 5, 1.0
    config = replace(jobs_config, results=replace(jobs_config.results, duplicate_window_s=window)) \
        if past_window else jobs_config
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    client = queue.client
    with Relay(nats_server.port) as relay, \
            FleetClient.connect(replace(config, nats=replace(config.nats, urls=(relay.url,))), name="a") as a, \
            FleetClient.connect(config, name="b") as b:
        ensure_results_stream(b)  # the config's duplicate window
        worker_a, worker_b = JobWorker(a, "a"), JobWorker(b, "b")
        job_a = worker_a.take(timeout_s=5)
        assert job_a is not None and job_a.attempt == 1
        attempt_a = Attempt(a, job_id)
        for seq in range(partial):
            attempt_a.publish(seq)
        relay.blackhole()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(attempt_a.publish, partial)  # into the cable
            job_b = worker_b.take(timeout_s=ACK_WAIT_S + 10)
            assert job_b is not None and job_b.attempt == 2
            attempt_b = Attempt(b, job_id)
            assert attempt_b.publisher.last_seq(job_id) == partial - 1
            for seq in range(partial, partial + 3):
                assert not attempt_b.publish(seq).duplicate
            if past_window:
                time.sleep(window + 1.0)  # the server forgets B's message ids
            relay.heal()
            with pytest.raises(Superseded):
                held.result(timeout=config.results.publish_timeout_s)
        # A's run stops there and hands the job back, as a node does: a later attempt holds it, nothing is acked
        assert hand_back(job_a, "results not stored") == "superseded"
        state = queue.get(job_id)
        assert (state.state, state.node, state.attempt) == ("running", "b", 2)
        assert client.run(client.js.stream_info(config.jobs.stream)).state.messages == 1  # still B's to settle
        # B hands it back (as if it died): it comes back, and is finished after the stored results
        assert hand_back(job_b, "stopped") == "released"
        again = worker_b.take(timeout_s=5)
        assert again is not None and again.job_id == job_id and again.attempt == 3
        attempt_c = Attempt(b, job_id)
        for seq in range(attempt_c.publisher.last_seq(job_id) + 1, frames):
            attempt_c.publish(seq)
        attempt_c.publish(frames, end=True)
        assert again.done()
        assert queue.get(job_id).state == "done"
        with ResultSubscriber.open(client, streams=[job_id], from_seq=1, timeout_s=5) as sub:
            seqs = [m.header.seq for m in sub]
        assert seqs == list(range(frames + 1))  # each frame once, in order, then the EndOfStream
        worker_a.close()
        worker_b.close()


def test_a_late_done_between_a_redelivery_and_its_claim_ends_the_job_once(queue, jobs_config, nats_server, tmp_path):
    """Node A, cut off past ack_wait_s, finishes its attempt after node B was handed the job again but before
    B marked it running. A's results are durable: the job is done. B must neither run it again nor overwrite
    that state with "running" (a B that then died would leave a done job running for ever)."""
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    client = queue.client
    with Relay(nats_server.port) as relay, \
            FleetClient.connect(replace(jobs_config, nats=replace(jobs_config.nats, urls=(relay.url,))),
                                name="a") as a, \
            FleetClient.connect(jobs_config, name="b") as b:
        worker_a, worker_b = JobWorker(a, "a"), JobWorker(b, "b")
        job_a = worker_a.take(timeout_s=5)
        assert job_a is not None and job_a.attempt == 1
        relay.blackhole()  # A's heartbeats stop reaching the server
        delivery = b.run(worker_b._next(ACK_WAIT_S + 10))  # attempt 2, fetched, not claimed yet
        assert delivery is not None and delivery.metadata.num_delivered == 2
        relay.heal()
        assert job_a.done()  # A's state write finds its own attempt's: done, acknowledged
        assert b.run(worker_b._claim(delivery)) is None  # nothing left to run
        state = queue.get(job_id)
        assert (state.state, state.node, state.attempt) == ("done", "a", 1)
        assert client.run(client.js.stream_info(jobs_config.jobs.stream)).state.messages == 0
        assert worker_b.take(timeout_s=ACK_WAIT_S + 1) is None  # and it never comes back
        worker_a.close()
        worker_b.close()


def test_progress_goes_into_the_jobs_state_and_only_over_its_own_running_state(queue, jobs_config, tmp_path):
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    with FleetClient.connect(jobs_config, name="a") as a:
        job = JobWorker(a, "a").take(timeout_s=5)
        assert job is not None
        job.report(12, 200, 6.5)
        running = wait_for(lambda: (s := queue.get(job_id)).frames == 12 and s, 5, "the progress stored", every=0.05)
        assert (running.state, running.frames_total, running.frames_per_s) == ("running", 200, 6.5)
        job.report(20, 200, 6.0)  # within jobs.status_interval_s of the last: written with the next one, or the end
        assert queue.get(job_id).frames == 12
        assert job.fail("stopped", retry=True)
        handed_back = queue.get(job_id)
        assert (handed_back.state, handed_back.frames, handed_back.frames_per_s) == ("queued", 20, 0.0)
        # a progress write on its way when the job was handed back, landing after it: no "running" again
        a.run(job._write_progress(running))
        assert queue.get(job_id) == handed_back
        job.report(30, 200, 6.0)  # after the end: nothing
        again = JobWorker(a, "a").take(timeout_s=5)
        assert again is not None and again.attempt == 2
        assert again.done(frames=200)
        done = queue.get(job_id)
        assert (done.state, done.attempt, done.frames, done.frames_total) == ("done", 2, 200, None)


def test_cancel_a_queued_job_a_running_one_and_a_done_one(queue, jobs_config, tmp_path):
    done_id, running_id, queued_id = queue.submit(inputs(tmp_path, 3))
    client = queue.client
    with FleetClient.connect(jobs_config, name="a") as a:
        worker = JobWorker(a, "a")
        finished, running = worker.take(timeout_s=5), worker.take(timeout_s=5)
        assert (finished.job_id, running.job_id) == (done_id, running_id)  # oldest first
        assert finished.done(frames=10)

        assert queue.cancel(queued_id).state == "queued"
        # its results stream ends at once (nobody else would end it), and no node ever runs it
        end = ResultPublisher(client).last_result(queued_id)
        assert isinstance(end, EndOfStream) and (end.header.seq, end.error) == (0, "cancelled")
        assert (s := queue.get(queued_id)).state == "cancelled" and s.error == "cancelled"
        assert worker.take(timeout_s=2) is None  # pulled and dropped

        before = queue.cancel(running_id, "wrong file")
        assert (before.state, before.node) == ("running", "a")
        assert not running.cancelled
        running.report(3, 30, 1.0)  # its node learns it at its next progress write
        wait_for(lambda: running.cancelled, 5, "the running attempt told of its cancel", every=0.05)
        assert running.cancelled == "cancelled: wrong file"
        assert queue.get(running_id).frames == 0  # the cancel kept the claim's figures
        running.settle_cancelled(frames=7)  # its run stopped there: written into the cancelled state
        state = queue.get(running_id)
        assert (state.state, state.error, state.attempt, state.node) == ("cancelled", "cancelled: wrong file", 1, "a")
        assert (state.frames, state.frames_total, state.frames_per_s) == (7, 30, 0.0)

        assert queue.cancel(done_id).state == "done"  # ended already: left as it was
        assert queue.get(done_id).state == "done"
        assert queue.cancel(queued_id).state == "cancelled"
        with pytest.raises(JobNotFound):
            queue.cancel("nope-00000000")
        assert client.run(client.js.stream_info(jobs_config.jobs.stream)).state.messages == 0
        assert worker.take(timeout_s=ACK_WAIT_S + 1) is None  # none comes back
        worker.close()


def test_a_job_cancelled_before_its_attempt_finishes_is_not_marked_done(queue, jobs_config, tmp_path):
    """The cancel lands between the attempt's last progress write and its done(): the job stays cancelled,
    the delivery is terminated (never delivered again), and done() says it did not settle it."""
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    with FleetClient.connect(jobs_config, name="a") as a:
        worker = JobWorker(a, "a")
        job = worker.take(timeout_s=5)
        queue.cancel(job_id)
        assert not job.done(frames=30) and job.cancelled == "cancelled"
        assert (s := queue.get(job_id)).state == "cancelled" and s.frames == 30  # where it got, all the same
        assert queue.client.run(queue.client.js.stream_info(jobs_config.jobs.stream)).state.messages == 0
        worker.close()


def test_a_cancelled_attempt_writes_where_it_stopped_only_over_its_own_cancelled_state(queue, jobs_config, tmp_path):
    """The node that stops a cancelled job writes its frames stored into the cancelled state (the cancel kept
    the last progress write's); an attempt the job was delivered again after (its node cut off past
    ack_wait_s) finds the cancel too, but the state names the later attempt: it writes nothing there."""
    (job_id,) = queue.submit(inputs(tmp_path, 1))
    with FleetClient.connect(jobs_config, name="a") as a, FleetClient.connect(jobs_config, name="b") as b:
        worker_a, worker_b = JobWorker(a, "a"), JobWorker(b, "b")
        stale = worker_a.take(timeout_s=5)
        assert stale is not None and stale._heartbeat is not None
        stale._heartbeat.cancel()  # its heartbeats stop, as when its node is cut off: delivered again
        later = worker_b.take(timeout_s=ACK_WAIT_S + 10)
        assert later is not None and later.attempt == 2
        later.report(4, 40, 2.0)
        wait_for(lambda: queue.get(job_id).frames == 4, 5, "the later attempt's progress stored", every=0.05)
        queue.cancel(job_id, "wrong file")
        stale.report(9, 40, 3.0)
        wait_for(lambda: stale.cancelled, 5, "the stale attempt told of the cancel", every=0.05)
        stale.settle_cancelled(frames=9)
        state = queue.get(job_id)
        assert (state.state, state.node, state.attempt, state.frames) == ("cancelled", "b", 2, 4)
        later.settle_cancelled(frames=6)
        state = queue.get(job_id)
        assert (state.state, state.node, state.attempt, state.error) == ("cancelled", "b", 2, "cancelled: wrong file")
        assert (state.frames, state.frames_total, state.frames_per_s) == (6, 40, 0.0)
        assert queue.client.run(queue.client.js.stream_info(jobs_config.jobs.stream)).state.messages == 0
        worker_a.close()
        worker_b.close()
