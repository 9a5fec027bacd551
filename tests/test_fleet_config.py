"""Fleet pieces that need no server: the config, subject tokens, the results payload, control records."""

from __future__ import annotations

import dataclasses
import re
import struct

import msgpack
import numpy as np
import pytest
import yaml
from maskstream.configs import CONFIG_DIR
from maskstream.pipeline.client import SchemaVersionError
from maskstream.pipeline.config import ConfigError, dump_config, load_config, loads_config
from maskstream.pipeline.fleet import records
from maskstream.pipeline.fleet.config import FleetConfig
from maskstream.pipeline.fleet.jobs import JobRequest, JobState, new_job_id
from maskstream.pipeline.fleet.leases import (
    Camera,
    CameraStatus,
    Lease,
    NodeInfo,
    check_labels,
    check_requires,
    parse_labels,
    plan_claims,
    satisfies,
)
from maskstream.pipeline.fleet.results import (
    decode_result,
    encode_result,
    message_id,
    pack_frames,
    stream_from_token,
    stream_token,
    subject_of,
    unpack_frames,
)
from maskstream.pipeline.runtime.messages import Detections, MessageError, encode

from tests.make_detections import end_of_stream, make_detections

# ---------------------------------------------------------------------------- config


def test_defaults_talk_to_one_loopback_server():
    cfg = load_config(FleetConfig)
    assert cfg.nats.urls == ("nats://127.0.0.1:4222",)
    assert cfg.replicas == 1 and cfg.nats.auth.method == "none" and not cfg.nats.tls.enabled
    assert loads_config(FleetConfig, dump_config(cfg)) == cfg


def test_the_bundled_fleet_yaml_is_the_defaults_key_for_key():
    path = CONFIG_DIR / "fleet.yaml"
    assert load_config(FleetConfig, path) == FleetConfig()
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(FleetConfig)}


def test_a_cluster_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "nats:\n  urls: [nats://10.0.0.1:4222, tls://10.0.0.2:4222]\n  tls: {ca: /etc/nats/ca.pem}\n"
        "  auth: {user: node, password: secret}\nreplicas: 3\nleases: {ttl_s: 6, renew_interval_s: 1.5}\n"
        "jobs: {ack_wait_s: 60, progress_interval_s: 20}\nresults: {max_age_s: 3600, max_bytes: -1}\n")
    cfg = load_config(FleetConfig, path, ["results.duplicate_window_s=600"])
    assert cfg.replicas == 3 and cfg.nats.tls.enabled and cfg.nats.auth.method == "user"
    assert cfg.leases.ttl_s == 6.0 and cfg.jobs.ack_wait_s == 60.0 and cfg.results.duplicate_window_s == 600.0


@pytest.mark.parametrize(("text", "needle"), [
    ("nats: {urls: [nats://10.1.2.3:4222]}", "off loopback without TLS"),
    ("nats: {urls: [http://127.0.0.1:4222]}", "not a server URL"),
    ("nats: {urls: []}", "at least one"),
    ("nats: {auth: {user: a}}", "user and password go together"),
    ("nats: {auth: {token: t, creds: /x.creds}}", "choose one way"),
    ("nats: {tls: {cert: /c.pem}}", "tls.cert and tls.key"),
    ("nats: {ping_interval_s: 0}", "ping_interval_s: expected a positive number"),
    ("nats: {max_outstanding_pings: 0}", "max_outstanding_pings: expected at least 1"),
    ("leases: {ttl_s: 2, renew_interval_s: 1}", "under half of ttl_s"),
    ("jobs: {ack_wait_s: 10, progress_interval_s: 5}", "under half of ack_wait_s"),
    ("jobs: {max_deliver: 0}", "at least 1"),
    ("jobs: {stream: 'has.dot'}", "not a valid JetStream name"),
    ("results: {subject_prefix: 'a.*'}", "not a plain subject"),
    ("results: {max_bytes: 0}", "positive size or -1"),
    ("replicas: 7", "1 to 5"),
    ("jobs: {subject: maskstream.results.jobs}", "overlap"),
    ("leases: {ttl: 5}", "unknown key"),
    ("leases: {ttl_s: soon}", "expected float"),
])
def test_bad_configs_say_what_is_wrong(text, needle):
    with pytest.raises(ConfigError, match=needle):
        loads_config(FleetConfig, text)


def test_plaintext_off_loopback_only_when_asked():
    cfg = loads_config(FleetConfig, "nats: {urls: [nats://nats.example:4222], allow_plaintext: true}")
    assert cfg.nats.allow_plaintext
    loads_config(FleetConfig, "nats: {urls: [nats://localhost:4222, 'nats://[::1]:4222']}")


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("sid", ["cam0", "clip.v2", "a b", "*", ">", "x=y", "kamera-ü", "日本", "a/b:c", "_-"])
def test_stream_tokens_are_subject_safe_and_reversible(sid):
    token = stream_token(sid)
    assert all(ch.isascii() and (ch.isalnum() or ch in "_-=") for ch in token)
    assert stream_from_token(token) == sid
    assert subject_of("maskstream.results", sid) == f"maskstream.results.{token}"


def test_tokens_are_one_to_one():
    ids = ["a.b", "a_b", "a=2Eb", "a-b", "a b", "ab"]
    assert len({stream_token(s) for s in ids}) == len(ids)
    with pytest.raises(ValueError, match="canonical"):
        stream_from_token("=41")  # "A" spelled escaped
    with pytest.raises(ValueError, match="not a stream token"):
        stream_from_token("a.b")
    with pytest.raises(ValueError, match="does not decode"):
        stream_from_token("=FF")
    with pytest.raises(ValueError, match="non-empty"):
        stream_token("")


def test_message_ids():
    assert message_id("clip.v2", 7) == "clip=2Ev2:7"
    assert message_id("cam0", 7, epoch="42") == "cam0:42:7"
    with pytest.raises(ValueError, match="epoch"):
        message_id("cam0", 1, epoch="a:b")


# ---------------------------------------------------------------------------- payload


def test_payload_is_the_zeromq_frames_length_prefixed():
    det, _ = make_detections("clip.v2", 3)
    payload = encode_result(det)
    frames = [bytes(f) for f in encode(det)]
    count = struct.unpack_from("<I", payload)[0]
    lengths = struct.unpack_from(f"<{count}I", payload, 4)
    assert count == len(frames) and list(lengths) == [len(f) for f in frames]
    assert payload[4 * (1 + count):] == b"".join(frames)
    assert [bytes(v) for v in unpack_frames(payload)] == frames

    back = decode_result(payload)
    assert isinstance(back, Detections) and back.header == det.header
    for f in dataclasses.fields(Detections):
        a, b = getattr(det, f.name), getattr(back, f.name)
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
    eos = end_of_stream("clip.v2", 4, error="corrupt")
    assert decode_result(encode_result(eos)) == eos


@pytest.mark.parametrize("damage", ["short", "count", "lengths", "extra", "topic", "version", "pickle"])
def test_malformed_payloads_are_refused(damage):
    det, _ = make_detections("cam0", 1)
    frames = [bytes(f) for f in encode(det)]
    payload = pack_frames(frames)
    if damage == "short":
        payload = b"\x01"
    elif damage == "count":
        payload = struct.pack("<I", 100000) + payload[4:]
    elif damage == "lengths":
        payload = payload[:-1]
    elif damage == "extra":
        payload = payload + b"x"
    elif damage == "topic":
        payload = pack_frames([b"cam1", *frames[1:]])
    elif damage == "version":
        header = msgpack.unpackb(frames[1], raw=False)
        payload = pack_frames([frames[0], msgpack.packb({**header, "v": 99}), *frames[2:]])
    elif damage == "pickle":
        payload = pack_frames([b"cam0", b"\x80\x04\x95" + b"\x00" * 20])
    error = SchemaVersionError if damage == "version" else MessageError
    with pytest.raises(error):
        decode_result(payload)


# ---------------------------------------------------------------------------- records


def test_records_round_trip_and_are_strict_but_for_fields_a_newer_build_added():
    cam = Camera("door", "rtsp://10.0.0.5/stream", {"rtsp_transport": "udp"}, added_at=1.5)
    assert records.unpack(Camera, records.pack(cam)) == cam
    lease = Lease("door", "host-a", "ab12", 1.0, 2.0, CameraStatus(24.5, 100, 3, "stall"))
    assert records.unpack(Lease, records.pack(lease)) == lease
    state = JobState("clip-1a2b3c4d", "/data/clip.mp4", "running", "host-b", 2)
    assert records.unpack(JobState, records.pack(state)) == state

    raw = msgpack.unpackb(records.pack(cam), raw=False)
    for change, needle in [
        ({"v": 2}, "record version"),
        ({"kind": "Lease"}, "expected a Camera"),
        ({"fields": {"name": "door"}}, "url: missing required key"),
        ({"fields": {**raw["fields"], "options": {"a": 1}}}, "expected str, got int"),
        ({"fields": {**raw["fields"], "name": ""}}, "camera name"),
    ]:
        with pytest.raises(records.RecordError, match=needle):
            records.unpack(Camera, msgpack.packb({**raw, **change}))
    # a field a newer build added is skipped (a fleet upgrades one host at a time); the rest is as strict
    newer = {**raw, "fields": {**raw["fields"], "zone": "north", "added_at": 1.5}}
    assert records.unpack(Camera, msgpack.packb(newer)) == cam
    newer["fields"]["added_at"] = "yesterday"
    with pytest.raises(records.RecordError, match="added_at: expected float, got str"):
        records.unpack(Camera, msgpack.packb(newer))
    bad_state = msgpack.unpackb(records.pack(state), raw=False)
    bad_state["fields"]["state"] = "exploded"
    with pytest.raises(records.RecordError, match="expected one of"):
        records.unpack(JobState, msgpack.packb(bad_state))
    with pytest.raises(records.RecordError, match="not a msgpack record"):
        records.unpack(Camera, b"\xc1")


def test_job_ids_are_readable_unique_and_key_safe():
    ids = {new_job_id("/data/my clip.v2.mp4") for _ in range(50)}
    assert len(ids) == 50
    assert all(i.startswith("my_clip_v2-") for i in ids)
    JobRequest(ids.pop(), "/data/x.mp4", 0.0)
    with pytest.raises(ValueError, match="letters, digits"):
        JobRequest("a.b", "/x", 0.0)


# ---------------------------------------------------------------------------- the claim plan


def test_plan_spreads_by_capacity_least_loaded_first():
    # a: 2 of 4 held (0.5), b: 0 of 2, c: 1 of 8 (0.125)
    plan = plan_claims(["c1", "c2", "c3", "c4", "c5"], {"a": (2, 4), "b": (0, 2), "c": (1, 8)})
    assert plan == {"c1": "b", "c2": "c", "c3": "c", "c4": "c", "c5": "b"}  # c5: all at 0.5, b holds fewest
    # no room anywhere: nothing planned; room for one: exactly one
    assert plan_claims(["c1", "c2"], {"a": (2, 2)}) == {}
    assert plan_claims(["c2", "c1"], {"a": (1, 2), "b": (3, 3)}) == {"c1": "a"}
    # ties go to fewer held, then to the name
    assert plan_claims(["x"], {"b": (0, 1), "a": (0, 1)}) == {"x": "a"}


def test_plan_gives_free_cameras_to_warm_standbys_first_and_back_only_to_the_same_start():
    nodes = {"a": (0, 4), "b": (2, 4), "c": (1, 4)}
    # b's two warm standbys take the first two cameras although b is the most loaded; then by load
    assert plan_claims(["c1", "c2", "c3"], nodes, ready={"b": 2}) == {"c1": "b", "c2": "b", "c3": "a"}
    # among nodes with a standby, the least loaded; a standby without room counts for nothing
    assert plan_claims(["c1"], nodes, ready={"b": 1, "c": 1}) == {"c1": "c"}
    assert plan_claims(["c1"], {"a": (0, 2), "b": (2, 2)}, ready={"b": 1}) == {"c1": "a"}
    # a camera whose last holder (the caller passes only the same start of it) has room goes back to
    # it before any standby
    assert plan_claims(["c1", "c2"], nodes, {"c1": "a"}, {"b": 1}) == {"c1": "a", "c2": "b"}
    # a camera read offline (no standby runs it) goes by load and leaves the standby to the next one
    assert plan_claims(["c1", "c2"], nodes, ready={"b": 1}, cold={"c1"}) == {"c1": "a", "c2": "b"}


def test_plan_puts_cameras_only_on_nodes_whose_labels_satisfy_them():
    nodes = {"a": (0, 4), "b": (3, 4), "c": (0, 1)}
    labels = {"a": {"site": "yard"}, "b": {"site": "lobby", "gpu": "yes"}, "c": {"site": "lobby"}}
    requires = {"l1": {"site": "lobby"}, "g1": {"site": "lobby", "gpu": "yes"}, "r1": {"site": "roof"}}
    # g1 only b satisfies (although the most loaded); l1 goes to c, the least loaded lobby node; r1
    # no node satisfies: left out; x1 requires nothing: by load, as ever
    plan = plan_claims(["g1", "l1", "r1", "x1"], nodes, labels=labels, requires=requires)
    assert plan == {"g1": "b", "l1": "c", "x1": "a"}
    # the most constrained first: a1 (any node) would take c's one slot by name order, leaving l1 nowhere
    assert plan_claims(["a1", "l1"], {"a": (3, 3), "c": (0, 1)}, labels=labels, requires=requires) == {"l1": "c"}
    assert plan_claims(["a1", "l1"], {"a": (2, 3), "c": (0, 1)}, labels=labels,
                       requires=requires) == {"a1": "a", "l1": "c"}
    # a camera no node with room satisfies leaves the later cameras their plan
    assert plan_claims(["a0", "b1"], {"c": (1, 1), "a": (0, 1)}, labels=labels,
                       requires={"a0": {"site": "lobby"}}) == {"b1": "a"}
    # back to its last holder only if that one still satisfies it; a warm standby only among those that do
    assert plan_claims(["l1"], nodes, {"l1": "a"}, labels=labels, requires=requires) == {"l1": "c"}
    assert plan_claims(["l1"], nodes, {"l1": "b"}, labels=labels, requires=requires) == {"l1": "b"}
    assert plan_claims(["l1"], nodes, ready={"a": 1, "b": 1}, labels=labels, requires=requires) == {"l1": "b"}
    # a node that published no labels (an older build, or none given) satisfies only cameras without requirements
    assert plan_claims(["l1", "x1"], {"old": (0, 4)}, requires=requires) == {"x1": "old"}


def test_labels_and_requirements_are_checked_and_travel_in_the_records():
    assert satisfies({"site": "lobby", "gpu": "yes"}, {"site": "lobby"}) and satisfies({}, {})
    assert not satisfies({"site": "lobby"}, {"site": "lobby", "gpu": "yes"}) and not satisfies({}, {"gpu": "yes"})
    assert parse_labels("--label", ["site=lobby", "gpu=yes", "site=lobby"]) == {"site": "lobby", "gpu": "yes"}
    for items, needle in [(["site"], "--label site: expected KEY=VALUE"),
                          (["site="], "--label site=: value ''"),
                          (["=lobby"], "--label =lobby: key ''"),
                          (["site=a b"], "value 'a b' must be 1 to 63 ASCII"),
                          (["site=lobby,yard"], "value 'lobby,yard'"),
                          (["k=" + "v" * 64], "must be 1 to 63"),
                          (["site=a", "site=b"], "--label site=b: site is given twice")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            parse_labels("--label", items)
    assert check_labels("x", {"a.b_c-1": "V-2.x"}) == {"a.b_c-1": "V-2.x"}
    with pytest.raises(ValueError, match="camera 'door' requires: key '-x'"):
        Camera("door", "rtsp://x", requires={"-x": "1"})
    # a requirement may name alternatives; a label never does
    assert satisfies({"site": "yard"}, {"site": "lobby|yard"}) and satisfies({"site": "lobby"}, {"site": "lobby|yard"})
    assert not satisfies({"site": "roof"}, {"site": "lobby|yard"}) and not satisfies({}, {"site": "lobby|yard"})
    assert not satisfies({"site": "lobby|yard"}, {"site": "lobby"})
    assert parse_labels("--require", ["site=lobby|yard", "gpu=yes"], check_requires) == {"site": "lobby|yard",
                                                                                          "gpu": "yes"}
    for items, needle in [(["site=lobby|"], "value ''"), (["site=|yard"], "value ''"),
                          (["site=a|a"], "site=a|a names an alternative twice"), (["site=a|b c"], "value 'b c'")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            parse_labels("--require", items, check_requires)
    with pytest.raises(ValueError, match=re.escape("value 'lobby|yard'")):
        parse_labels("--label", ["site=lobby|yard"])
    assert Camera("gate", "rtsp://x", requires={"site": "lobby|yard"}).requires == {"site": "lobby|yard"}

    cam = Camera("door", "rtsp://x", requires={"site": "lobby"})
    info = NodeInfo("a", "ab12", 4, 1, 1.0, 2.0, ("j1",), 1, "host-a", 42, {"site": "lobby", "gpu": "yes"})
    assert records.unpack(Camera, records.pack(cam)) == cam and records.unpack(NodeInfo, records.pack(info)) == info
    # as an older build writes them, without the field: no requirements, no labels
    for record, cls, name in [(cam, Camera, "requires"), (info, NodeInfo, "labels")]:
        raw = msgpack.unpackb(records.pack(record), raw=False)
        del raw["fields"][name]
        assert getattr(records.unpack(cls, msgpack.packb(raw)), name) == {}
    raw = msgpack.unpackb(records.pack(cam), raw=False)
    raw["fields"]["requires"] = {"site": "lobby yard"}
    with pytest.raises(records.RecordError, match="value 'lobby yard'"):
        records.unpack(Camera, msgpack.packb(raw))
