"""Fleet settings: where the NATS cluster is, how to authenticate, and the JetStream names and limits.

A YAML file mirrors `FleetConfig` key for key (`maskstream.pipeline.config.load_config(FleetConfig,
path, overrides)`); every check here raises ValueError, which the loader reports as a ConfigError
naming the key. The defaults talk to one server on loopback without credentials, with one replica
of everything; a cluster sets `nats.urls` to its servers and `replicas: 3`.

Plain-text NATS off loopback is refused unless TLS is configured or `nats.allow_plaintext` says
so, as credentials and results would otherwise cross the network readable by anyone on the path.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

__all__ = ["FleetConfig", "JobsConfig", "LeaseConfig", "NatsAuth", "NatsConfig", "NatsTls", "ResultsConfig"]

# JetStream stream, consumer and KV bucket names: one subject token, no wildcards.
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_SCHEMES = {"nats", "tls", "ws", "wss"}


def _check_name(what: str, value: str) -> None:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{what}: {value!r} is not a valid JetStream name (letters, digits, '_', '-')")


def _check_positive(what: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{what}: expected a positive number of seconds, got {value!r}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class NatsAuth:
    """At most one way to authenticate: user + password, a token, an NKey seed file, or a creds file."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed: Path | None = None  # file holding the user's NKey seed (SU...)
    creds: Path | None = None  # a decentralised-auth .creds file (JWT + seed)

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together: set both or neither")
        methods = [name for name, on in (("user/password", self.user is not None), ("token", self.token is not None),
                                         ("nkey_seed", self.nkey_seed is not None), ("creds", self.creds is not None))
                   if on]
        if len(methods) > 1:
            raise ValueError(f"choose one way to authenticate, got {', '.join(methods)}")

    @property
    def method(self) -> str:
        for name, value in (("user", self.user), ("token", self.token), ("nkey", self.nkey_seed),
                            ("creds", self.creds)):
            if value is not None:
                return name
        return "none"


@dataclass(frozen=True)
class NatsTls:
    """TLS to the servers: a CA to verify them, and a client certificate where they require one."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    hostname: str | None = None  # the name to verify the server certificate against, if not the URL's host

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key go together: set both or neither")

    @property
    def enabled(self) -> bool:
        return self.ca is not None or self.cert is not None


def check_server_url(url: str, where: str = "") -> SplitResult:
    """A NATS server's URL (nats://, tls://, ws://, wss:// with a host and, if any, a numeric port)."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ValueError(f"{where}{url!r} is not a server URL; expected e.g. nats://127.0.0.1:4222")
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        raise ValueError(f"{where}{url!r} has a bad port") from None
    return parts


def server_urls_option(items: list[str], option: str = "--nats") -> list[str]:
    """The server URLs of a repeatable command-line option (each item may hold several, comma-separated),
    each checked; a ValueError names the option, not the config file's nats.urls it stands for."""
    urls = [url for item in items for url in item.split(",") if url]
    for url in urls:
        check_server_url(url, f"{option} ")
    return urls


@dataclass(frozen=True)
class NatsConfig:
    urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    auth: NatsAuth = field(default_factory=NatsAuth)
    tls: NatsTls = field(default_factory=NatsTls)
    allow_plaintext: bool = False  # plain nats:// to a host off loopback without TLS
    connect_timeout_s: float = 2.0  # one attempt at one server
    reconnect_wait_s: float = 0.5  # between attempts at the same server
    request_timeout_s: float = 5.0  # one JetStream API request or publish acknowledgement
    # The client pings its server every ping_interval_s and declares the connection stale, moving to
    # another server, when more than max_outstanding_pings go unanswered: a link that went silent
    # (a pulled cable, a dead switch port, a NAT that dropped the flow: TCP sees nothing wrong) is
    # left after max_outstanding_pings to max_outstanding_pings + 1 intervals. Short enough that a
    # node moves before its leases' ttl_s runs out; long enough that a host whose pipelines use every
    # core answers in time (docs/fleet.md, "A node whose link to its server is pulled", has the measurements).
    ping_interval_s: float = 1.0
    max_outstanding_pings: int = 2

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("urls: expected at least one nats:// URL")
        for url in self.urls:
            parts = check_server_url(url, "urls: ")
            secure = parts.scheme in ("tls", "wss") or self.tls.enabled
            if not (secure or is_loopback(parts.hostname or "") or self.allow_plaintext):
                raise ValueError(
                    f"urls: {url!r} is off loopback without TLS: configure tls (ca, cert/key) or set "
                    f"allow_plaintext: true to send credentials and results unencrypted"
                )
        for name in ("connect_timeout_s", "reconnect_wait_s", "request_timeout_s", "ping_interval_s"):
            _check_positive(name, getattr(self, name))
        if self.max_outstanding_pings < 1:
            raise ValueError(f"max_outstanding_pings: expected at least 1, got {self.max_outstanding_pings!r}")

    @property
    def stale_after_s(self) -> float:
        """The longest a silent link goes unnoticed: the pings sent into it go unanswered, and the
        connection is declared stale at the first ping time past max_outstanding_pings of them."""
        return (self.max_outstanding_pings + 1) * self.ping_interval_s


@dataclass(frozen=True)
class LeaseConfig:
    """Cameras and who runs them (see leases.py for the claim rule)."""

    cameras_bucket: str = "maskstream_cameras"  # camera name -> URL + options (no expiry)
    leases_bucket: str = "maskstream_leases"  # camera name -> holder; entries expire ttl_s after their last renewal
    nodes_bucket: str = "maskstream_nodes"  # node name -> capacity, load; expire like leases
    ttl_s: float = 5.0  # a node that stops renewing loses its cameras this long after its last renewal
    renew_interval_s: float = 1.0
    claim_grace_s: float = 2.0  # a camera free this long may be claimed by any node with room, planned or not
    # a node the cluster answers (its probes) whose leases bucket does not (a leader election after
    # a server's death) keeps its cameras this long past ttl_s, and takes them back once it answers;
    # a node nothing answers (cut off) gives them up at ttl_s
    election_grace_s: float = 15.0
    # `fleet add/remove/list/status` (CameraRegistry) and a LeaseManager's start retry a request nobody
    # answers (a bucket just made, a leader election) this long
    change_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        for name in ("cameras_bucket", "leases_bucket", "nodes_bucket"):
            _check_name(name, getattr(self, name))
        for name in ("ttl_s", "renew_interval_s", "claim_grace_s", "election_grace_s", "change_timeout_s"):
            _check_positive(name, getattr(self, name))
        if self.renew_interval_s * 2 >= self.ttl_s:
            raise ValueError(
                f"renew_interval_s ({self.renew_interval_s}) must be under half of ttl_s ({self.ttl_s}), so that "
                f"one late renewal does not lose a lease"
            )


@dataclass(frozen=True)
class JobsConfig:
    """Offline jobs: a work-queue stream, one durable consumer shared by all nodes, a state bucket."""

    stream: str = "MASKSTREAM_JOBS"
    subject: str = "maskstream.jobs"
    consumer: str = "maskstream-workers"
    state_bucket: str = "maskstream_jobs"
    ack_wait_s: float = 30.0  # a job not acknowledged (or extended) this long is redelivered
    progress_interval_s: float = 10.0  # how often a running job tells the server it is still being worked on
    status_interval_s: float = 2.0  # how often a running job's frames and frames/s go into its state (fleet jobs)
    max_deliver: int = 5  # deliveries of one job before it is given up
    max_age_s: float = 7 * 86400.0  # a job nobody takes is dropped after this long
    state_max_age_s: float = 7 * 86400.0  # job states are forgotten after this long

    def __post_init__(self) -> None:
        for name in ("stream", "consumer", "state_bucket"):
            _check_name(name, getattr(self, name))
        if not _SUBJECT.fullmatch(self.subject):
            raise ValueError(f"subject: {self.subject!r} is not a plain subject (tokens of letters, digits, _ -)")
        for name in ("ack_wait_s", "progress_interval_s", "status_interval_s", "max_age_s", "state_max_age_s"):
            _check_positive(name, getattr(self, name))
        if self.progress_interval_s * 2 >= self.ack_wait_s:
            raise ValueError(
                f"progress_interval_s ({self.progress_interval_s}) must be under half of ack_wait_s "
                f"({self.ack_wait_s}), or a running job would be redelivered"
            )
        if self.max_deliver < 1:
            raise ValueError(f"max_deliver: expected at least 1, got {self.max_deliver}")


@dataclass(frozen=True)
class ResultsConfig:
    """Detections and EndOfStream on `subject_prefix.<stream token>`, kept in one stream for replay."""

    stream: str = "MASKSTREAM_RESULTS"
    subject_prefix: str = "maskstream.results"
    max_age_s: float = 86400.0  # results older than this are dropped
    max_bytes: int = 1 << 30  # the stream's size cap, oldest dropped first; -1: none
    duplicate_window_s: float = 120.0  # a (stream, seq) published again within this is stored once
    publish_timeout_s: float = 30.0  # how long a publish, or a subscriber's start, keeps retrying (elections)

    def __post_init__(self) -> None:
        _check_name("stream", self.stream)
        if not _SUBJECT.fullmatch(self.subject_prefix):
            raise ValueError(f"subject_prefix: {self.subject_prefix!r} is not a plain subject")
        for name in ("max_age_s", "duplicate_window_s", "publish_timeout_s"):
            _check_positive(name, getattr(self, name))
        if self.max_bytes != -1 and self.max_bytes <= 0:
            raise ValueError(f"max_bytes: expected a positive size or -1, got {self.max_bytes}")
        if self.duplicate_window_s > self.max_age_s:
            raise ValueError("duplicate_window_s cannot exceed max_age_s")


@dataclass(frozen=True)
class FleetConfig:
    nats: NatsConfig = field(default_factory=NatsConfig)
    replicas: int = 1  # copies of every stream and bucket: 3 on a 3-server cluster survives one server's loss
    leases: LeaseConfig = field(default_factory=LeaseConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 5:
            raise ValueError(f"replicas: JetStream keeps 1 to 5 copies, got {self.replicas}")
        subjects = {"jobs.subject": self.jobs.subject, "results.subject_prefix": self.results.subject_prefix}
        if _overlaps(self.jobs.subject, self.results.subject_prefix):
            raise ValueError(f"jobs.subject and results.subject_prefix overlap: {subjects}")


def _overlaps(subject: str, prefix: str) -> bool:
    """Whether `subject` falls under `prefix.>` or equals `prefix` (two streams cannot share subjects)."""
    return subject == prefix or subject.startswith(prefix + ".") or prefix.startswith(subject + ".")
