"""Publishing beyond this host is a decision: a bind other hosts can reach is named in a warning,
and CurveZMQ encrypts the published results and lets in only authorised subscribers. Real sockets,
real keys (zmq.auth), the real pipeline and `maskstream subscribe`."""
from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq.auth
from maskstream.pipeline.client import Subscriber
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.run_config import OutputOptions, RunConfig, publish_curve, publish_exposure
from maskstream.pipeline.runtime.messages import Detections, Header
from maskstream.pipeline.runtime.transport import Publisher, curve_server

from tests.pipeline_runs import ROOT, TINY_MODEL_SETS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def keys(tmp_path):
    """server.key(_secret); clients/ holding the authorised client's public key; an intruder's keys apart."""
    for folder in ("server", "client", "clients", "intruder"):
        (tmp_path / folder).mkdir()
    server_public, server_secret = zmq.auth.create_certificates(tmp_path / "server", "server")
    client_public, client_secret = zmq.auth.create_certificates(tmp_path / "client", "client")
    (tmp_path / "clients" / "client.key").write_bytes(Path(client_public).read_bytes())
    _, intruder_secret = zmq.auth.create_certificates(tmp_path / "intruder", "intruder")
    return {"server": Path(server_public), "server_secret": Path(server_secret), "clients": tmp_path / "clients",
            "client_secret": Path(client_secret), "intruder_secret": Path(intruder_secret)}


def detections(seq: int) -> Detections:
    return Detections(Header("cam", seq), (4, 4), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                      np.zeros(0, np.int32), (), np.zeros((0, 4), np.int32), ())


def test_curve_publisher_reaches_the_authorised_subscriber_only(keys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    publisher = Publisher(endpoint, 1000, curve_server(keys["server_secret"], keys["clients"]))
    subscribers = {
        "authorised": Subscriber(endpoint, server_key=keys["server"], client_key=keys["client_secret"]),
        "unauthorised": Subscriber(endpoint, server_key=keys["server"], client_key=keys["intruder_secret"]),
        "plain": Subscriber(endpoint),
    }
    received: dict[str, list[int]] = {name: [] for name in subscribers}
    try:
        seq, deadline = 0, time.monotonic() + 30
        while len(received["authorised"]) < 20:  # keeps sending while the handshakes settle
            assert time.monotonic() < deadline, received
            publisher.send(detections(seq))
            seq += 1
            for name, subscriber in subscribers.items():
                try:
                    while True:
                        received[name].append(subscriber.recv(timeout_s=0.01).header.seq)
                except TimeoutError:
                    pass
        for name in ("unauthorised", "plain"):
            with pytest.raises(TimeoutError):
                received[name].append(subscribers[name].recv(timeout_s=1.0).header.seq)
    finally:
        for subscriber in subscribers.values():
            subscriber.close()
        publisher.close()
    assert received["unauthorised"] == [] and received["plain"] == []
    assert received["authorised"] == sorted(received["authorised"]) and len(received["authorised"]) >= 20


def test_curve_keys_are_checked_with_a_clear_error(keys, tmp_path):
    with pytest.raises(ValueError, match=r"server\.key: holds only a public key; expected the secret key file"):
        curve_server(keys["server"], keys["clients"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no public key files \(\*\.key\)"):
        curve_server(keys["server_secret"], tmp_path / "empty")
    with pytest.raises(ValueError, match=r"missing\.key_secret: not a CurveZMQ key file"):
        curve_server(tmp_path / "missing.key_secret", keys["clients"])
    with pytest.raises(ValueError, match="go together"):
        publish_curve(OutputOptions(publish="tcp://127.0.0.1:1", publish_key=keys["server_secret"]))
    with pytest.raises(ValueError, match="nothing is published"):
        publish_curve(OutputOptions(publish_key=keys["server_secret"], publish_clients=keys["clients"]))
    with pytest.raises(ValueError, match="go together"):
        Subscriber("tcp://127.0.0.1:1", server_key=keys["server"])


def test_which_publish_endpoints_other_hosts_reach():
    for local in ("tcp://127.0.0.1:5556", "tcp://127.0.0.2:5556", "tcp://localhost:5556", "tcp://[::1]:5556",
                  "ipc:///tmp/x", "inproc://x"):
        assert publish_exposure(local) is None, local
    for everywhere in ("tcp://*:5597", "tcp://0.0.0.0:5597", "tcp://[::]:5597"):
        assert publish_exposure(everywhere) == "every network interface"
    assert publish_exposure("tcp://192.168.1.5:5556") == "192.168.1.5"
    assert publish_exposure("tcp://eth0:5556") == "eth0"


def test_a_plain_bind_beyond_loopback_is_named_in_a_warning_and_loopback_is_not(caplog):
    from maskstream.pipeline.cli.run import _exposure_warning

    caplog.set_level(logging.INFO, logger="maskstream.run")
    for endpoint in ("tcp://*:5597", "tcp://10.1.2.3:5597", "tcp://127.0.0.1:5597", "ipc:///tmp/x"):
        _exposure_warning(RunConfig(outputs=OutputOptions(publish=endpoint)))
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]
    first, second = (r.getMessage() for r in caplog.records)
    assert first.startswith("--publish tcp://*:5597 listens on every network interface, unencrypted: anyone who "
                            "can reach this host there reads every result")
    assert second.startswith("--publish tcp://10.1.2.3:5597 listens on 10.1.2.3, unencrypted")


def test_run_on_every_interface_warns_and_curve_subscribe_gets_every_frame_a_plain_one_none(keys, tmp_path):
    clip = write_test_clip(tmp_path / "clip.mp4", frames=8, size=(160, 120))
    port = free_port()
    subscribe = [sys.executable, "-m", "maskstream.pipeline.cli", "subscribe", f"tcp://127.0.0.1:{port}",
                 "--stream", "clip"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    authorised = subprocess.Popen([*subscribe, "--server-key", str(keys["server"]), "--client-key",
                                   str(keys["client_secret"]), "--out", str(tmp_path / "sub.jsonl"),
                                   "--timeout", "200"], **pipes)
    plain = subprocess.Popen([*subscribe, "--timeout", "200"], **pipes)
    try:
        time.sleep(1.0)  # both connected (and refused or not) before anything is published
        sets = [x for s in TINY_MODEL_SETS for x in ("--set", s)]
        run = subprocess.run([sys.executable, "-m", "maskstream.pipeline.cli", "run", "--quiet", "--source", str(clip),
                              "--out-dir", str(tmp_path / "out"), "--publish", f"tcp://*:{port}", "--publish-key",
                              str(keys["server_secret"]), "--publish-clients", str(keys["clients"]), *sets],
                             cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr
        _, err = authorised.communicate(timeout=60)
        assert authorised.returncode == 0, err
    finally:
        authorised.kill()
        plain.kill()
        plain_out, plain_err = plain.communicate()
    warning = re.search(r"^.* WARNING maskstream\.run: --publish (.*)$", run.stderr, re.MULTILINE)
    assert warning is not None, run.stderr
    assert warning.group(1) == (f"tcp://*:{port} listens on every network interface, encrypted with CurveZMQ, and "
                                f"only the subscribers whose public keys are in {keys['clients']} are let in")
    lines = [json.loads(line) for line in (tmp_path / "sub.jsonl").read_text().splitlines()]
    assert [line["seq"] for line in lines] == list(range(9)) and lines[-1]["kind"] == "EndOfStream"
    assert plain_out == "" and "clip:" not in plain_err  # nothing at all arrived
