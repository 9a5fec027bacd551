"""Credentials and TLS from the fleet config, against real servers that require them."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import nkeys
import pytest
from maskstream.pipeline.fleet.config import FleetConfig, NatsAuth, NatsConfig, NatsTls
from maskstream.pipeline.fleet.connection import FleetClient, FleetError, FleetUnavailable
from maskstream.pipeline.fleet.results import ResultPublisher, ResultSubscriber, ensure_results_stream

from tests.make_detections import make_detections


def config(url, auth=None, tls=None):
    return FleetConfig(nats=NatsConfig(urls=(url,), auth=auth or NatsAuth(), tls=tls or NatsTls(),
                                       connect_timeout_s=1.0, reconnect_wait_s=0.2, request_timeout_s=2.0))


def round_trip(cfg):
    """Store one result and read it back: the connection can use JetStream."""
    with FleetClient.connect(cfg) as client:
        ensure_results_stream(client)
        det, _ = make_detections("cam0", 3)
        ResultPublisher(client).publish(det)
        with ResultSubscriber.open(client, streams=["cam0"], from_seq=1, timeout_s=5) as sub:
            assert sub.recv().header.seq == 3


def refused_quickly(cfg, needle):
    started = time.monotonic()
    with pytest.raises(FleetError, match=needle):
        FleetClient.connect(cfg).close()
    return time.monotonic() - started


def test_user_and_password(make_nats_server):
    server = make_nats_server("--user", "node", "--pass", "s3cret-pass")
    round_trip(config(server.url, NatsAuth(user="node", password="s3cret-pass")))
    assert refused_quickly(config(server.url, NatsAuth(user="node", password="wrong")), "refused") < 3
    assert refused_quickly(config(server.url), "refused") < 3  # no credentials at all


def test_token(make_nats_server):
    server = make_nats_server("--auth", "tok-3f9a")
    round_trip(config(server.url, NatsAuth(token="tok-3f9a")))
    refused_quickly(config(server.url, NatsAuth(token="nope")), "refused")


def test_nkey_seed_file(make_nats_server, tmp_path):
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    conf = tmp_path / "auth.conf"
    conf.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    server = make_nats_server("-c", str(conf))
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    round_trip(config(server.url, NatsAuth(nkey_seed=seed_file)))

    other = tmp_path / "other.nk"
    other.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER) + b"\n")
    refused_quickly(config(server.url, NatsAuth(nkey_seed=other)), "refused")
    with pytest.raises(FleetError, match="nkey_seed: cannot read"):
        FleetClient.connect(config(server.url, NatsAuth(nkey_seed=tmp_path / "missing.nk")))
    with pytest.raises(FleetError, match="creds: cannot read"):
        FleetClient.connect(config(server.url, NatsAuth(creds=tmp_path / "missing.creds")))


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=maskstream test CA")
    extensions = {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost", "client": "extendedKeyUsage=clientAuth"}
    for name, ext in extensions.items():
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (tmp_path / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return tmp_path


def test_tls_with_client_certificates(make_nats_server, pki):
    server = make_nats_server("--tlsverify", "--tlscert", str(pki / "server.pem"), "--tlskey", str(pki / "server.key"),
                              "--tlscacert", str(pki / "ca.pem"))
    mutual = NatsTls(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key")
    round_trip(config(server.url, tls=mutual))
    # without a client certificate, or trusting another CA, no connection
    with pytest.raises(FleetUnavailable, match="(?i)certificate required"):
        FleetClient.connect(config(server.url, tls=NatsTls(ca=pki / "ca.pem")), timeout_s=1.5)
    with pytest.raises(FleetUnavailable, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        FleetClient.connect(config(server.url, tls=NatsTls(ca=pki / "client.pem", cert=pki / "client.pem",
                                                           key=pki / "client.key")), timeout_s=1.5)
    with pytest.raises(FleetError, match="nats.tls: cannot load"):
        FleetClient.connect(config(server.url, tls=NatsTls(ca=pki / "missing.pem")))
