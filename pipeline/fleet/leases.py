"""Live cameras as fleet state, and the leases by which nodes share them.

Three JetStream KV buckets (names in LeaseConfig):
- cameras: camera name -> `Camera` (URL, source options, and the node labels it requires).
  `CameraRegistry` adds, replaces, removes and lists them; nothing expires.
- leases: camera name -> `Lease` (which node runs it, since when, its frames/s, drops, last
  error). The bucket's TTL is `ttl_s`: an entry vanishes `ttl_s` after its last write, and the
  server leaves a marker that every watcher sees at once.
- nodes: node name -> `NodeInfo` (capacity, cameras held, labels), with the same TTL: the live nodes.
Keys are `results.stream_token(name)`, so any name is a valid key.

A `LeaseManager` runs one node's side, on the FleetClient's loop (so renewals go on whatever the
node's main thread is doing). Each tick (`renew_interval_s`, or at once when a watch reports a
change) it
1. writes its NodeInfo (before its leases, so a dead node drops out of everyone's plan no later
   than its cameras come free);
2. renews each lease it holds by compare-and-set on the key's revision (`update(key, last=rev)`);
   a refused update means another node holds the camera now: the lease is lost. A lease it could
   not renew for `ttl_s` while cut off from the cluster is also given up, since by then the
   server has let it expire and another node may run it (a leader election is the exception:
   below);
3. releases cameras that were removed, and those whose requirements it no longer satisfies (and
   reports cameras whose URL or options changed);
4. claims free cameras, within its capacity, by the rule below, with a compare-and-set that
   expects the key's latest revision (absent, deleted, or an expiry marker), so of two nodes
   claiming one camera exactly one wins. A claim that went unanswered may be stored all the
   same: a lease of this very start of the node that shows up for that camera is held.

The claim rule (only where the camera can run; warm first, then spread by capacity, least-loaded
first): every node computes the same plan from the same view. A camera may go only to a node that
satisfies its requirements: every KEY=VALUE of `Camera.requires` is among the node's labels
(`NodeInfo.labels`, e.g. site=lobby, gpu=yes); a camera without requirements may go to any node.
A free camera whose last holder is live, as the same start of the node (its NodeInfo names the
lease's instance), satisfies it and has room goes back to it. The other free cameras are taken
fewest satisfying live nodes first (a camera only one site can run before one any node can),
then in name order; each goes, among the live nodes that satisfy it, to one that has room and a
warm standby pipeline not yet planned for (NodeInfo.ready: a standby takes a camera over in a
second or two, where a cold pipeline first loads its model), else to one with room; among either kind,
to the lowest load after the cameras planned so far, load being cameras held / capacity, ties to
fewer cameras held, then to the node name. A node restarted under its name (a service manager
starting it again at once) is a new start: its cameras are not its own any more, and they go to
nodes whose standbys wait warm rather than back to it cold. A camera whose options read it offline
(`policy=offline`), which no standby runs, goes by load alone. Standbys are made again after a
takeover, so in a steady fleet every node offers one and the rule is the spread by load.

A node claims what the plan gives it. A camera that stays free for `claim_grace_s` (the planned
node is stuck, or views differ) may be claimed by any node with room that satisfies it: a node
never claims a camera whose requirements it does not satisfy, planned or not. A camera that no
live node satisfies stays free, and is claimed as soon as such a node's presence shows up. Cameras
already held are never taken away, with one exception: a camera whose requirements change
(`fleet add --replace`) so that its holder no longer satisfies them is released by the holder (as
a removed camera is) and planned again among the nodes that do. A node that joins later gets new
and orphaned cameras, it does not rebalance running ones.

Failover: a node that dies stops renewing; its leases expire `ttl_s` after their last renewal,
the expiry markers wake the other nodes, which plan and claim at once. So a camera resumes about
`ttl_s` (plus the server's expiry check and one claim) after its node's last renewal.

The view comes from KV watches, the fast path. A watch is a consumer on one server, and when that
server dies the watch lags until its missed heartbeats make it start again (many seconds), so
every `ttl_s / 2` a node also catches up by direct reads, which any replica answers even while
a bucket elects its leader: the cameras and nodes buckets' messages after the latest revision
it has of each (deletes, purges and the server's expiry markers end a key), then every camera's
lease key. A camera added, replaced or removed while a watch lags thus reaches the node within
one such period.

A server's death: nodes reconnect to the others and keep renewing. If it led the leases bucket,
no lease can be written until the other two elect a leader (a raft election: seconds, longer
than a short TTL), and leases not renewed for `ttl_s` lapse on the server. Nobody can claim a
camera while nobody can write, so a node that is connected and whose renewals go unanswered
keeps its cameras running for `election_grace_s` past `ttl_s`; once the bucket answers it
renews them, or, where they lapsed, takes them back by compare-and-set on the expiry marker's
revision, and the runs go on. "Connected" means answered, not the connection's state (a pulled
cable leaves that connected until its pings go unanswered): a probe any server answers goes out every
`check_interval`, and a node none of whose recent probes was answered (cut off: it cannot tell an
election from its own isolation, while the others may claim its cameras) gives a camera up at
`ttl_s` after sending its last answered renewal, checked apart from the ticks, before the server
lets the lease expire. So that
the others leave it the time, a node claims no camera that had a holder for `claim_grace_s`
after a write of its own went unanswered (every node's writes do, while the bucket elects); a
camera that never had one is claimed at once. A holder slower than that
(its ticks longer than `claim_grace_s`) loses the camera to another node: a failover as after a
node's death.

Events for the node (`LeaseManager.events`): `acquired` (start this camera; `revision` is the
lease's revision, fit to tell this run of the camera from earlier ones), `lost` (stop now:
another node may run it already), `released` (stopped by this node: removed, its requirements
no longer satisfied here, or shutting down; `reason` says which), `updated` (its URL or options
changed: restart it; a change of its requirements alone that this node still satisfies is none).

Labels and requirements: keys and values are 1 to 63 characters of ASCII letters, digits, `.`,
`_` and `-`, starting with a letter or digit (`check_labels`): stricter than camera names, so that
KEY=VALUE items on a command line and in `fleet status` columns read one way only. A requirement's
value may name alternatives, `site=lobby|yard`: a node with any one of them satisfies it
(`check_requires`, `satisfies`). Older builds
skip both fields (records.py): an older node claims any camera whatever it requires, so every node
runs a build that knows them before cameras rely on requirements.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import nats.errors
import nats.js.errors
from maskstream.pipeline.fleet import records
from maskstream.pipeline.fleet.config import FleetConfig, LeaseConfig
from maskstream.pipeline.fleet.connection import (
    UNAVAILABLE,
    WATCH_INACTIVE_S,
    FleetClient,
    FleetError,
    ends_key,
    kv_after,
    kv_last,
    kv_snapshot,
    retrying,
)
from maskstream.pipeline.fleet.results import stream_from_token, stream_token
from nats.js import api
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

__all__ = [
    "Camera",
    "CameraExists",
    "CameraNotFound",
    "CameraRegistry",
    "CameraRow",
    "CameraStatus",
    "Lease",
    "LeaseEvent",
    "LeaseManager",
    "NodeInfo",
    "NodeNameInUse",
    "check_labels",
    "check_requires",
    "describe_labels",
    "ensure_lease_buckets",
    "parse_labels",
    "plan_claims",
    "satisfies",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# A connection that went quiet: nothing was answered (a server's refusal is an answer).
_SILENCE = (nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError, nats.errors.NoServersError,
            nats.errors.OutboundBufferLimitError)

# A resync reads at most this many messages of a bucket that its watch has not delivered (the rest
# at the next resync), so that a watch lagging behind a busy nodes bucket cannot hold it up.
CATCH_UP_MAX = 256


class CameraExists(FleetError):
    """A camera of that name is already in the fleet."""


class NodeNameInUse(FleetError):
    """Another live node runs under this node's name (two nodes on one host left at --name's default)."""


class CameraNotFound(FleetError):
    """No camera of that name in the fleet."""


def check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 128 or not name.isprintable() or name != name.strip():
        raise ValueError(f"{what}: {name!r} must be 1 to 128 printable characters without surrounding spaces")
    return name


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_labels(what: str, labels: Mapping[str, str]) -> dict[str, str]:
    """labels as a dict, each key and value checked (module docstring: Labels and requirements)."""
    if not isinstance(labels, Mapping):
        raise ValueError(f"{what}: expected a mapping of KEY to VALUE, got {labels!r}")
    for key, value in labels.items():
        for part, text in (("key", key), ("value", value)):
            if not isinstance(text, str) or not _LABEL.fullmatch(text):
                raise ValueError(f"{what}: {part} {text!r} must be 1 to 63 ASCII letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")
    return dict(labels)


def check_requires(what: str, requires: Mapping[str, str]) -> dict[str, str]:
    """A camera's requirements as a dict: keys as labels', each value one label value or alternatives
    joined by `|` (site=lobby|yard), none empty nor twice."""
    if not isinstance(requires, Mapping):
        raise ValueError(f"{what}: expected a mapping of KEY to VALUE, got {requires!r}")
    for key, value in requires.items():
        if not isinstance(value, str):
            raise ValueError(f"{what}: value {value!r} of {key!r} is not text")
        alternatives = value.split("|")
        if len(set(alternatives)) != len(alternatives):
            raise ValueError(f"{what}: {key}={value} names an alternative twice")
        for alternative in alternatives:
            check_labels(what, {key: alternative})
    return dict(requires)


def parse_labels(what: str, items: Sequence[str],
                 check: Callable[[str, Mapping[str, str]], dict[str, str]] = check_labels) -> dict[str, str]:
    """KEY=VALUE items (a command line's) as labels, or with check=check_requires as requirements;
    ValueError naming `what` and the item."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{what} {item}: expected KEY=VALUE")
        if key in labels and labels[key] != value:
            raise ValueError(f"{what} {item}: {key} is given twice ({key}={labels[key]})")
        check(f"{what} {item}", {key: value})
        labels[key] = value
    return labels


def satisfies(labels: Mapping[str, str], requires: Mapping[str, str]) -> bool:
    """Whether a node with these labels may run a camera with these requirements: each of them matches,
    one of its alternatives where it names several (site=lobby|yard)."""
    return all(labels.get(key) in value.split("|") for key, value in requires.items())


def describe_labels(labels: Mapping[str, str]) -> str:
    """site=lobby,gpu=yes (sorted by key): how a command line gives them and `fleet status` shows them."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Camera:
    """One live source of the fleet. options: source settings for the node (see docs/fleet.md);
    requires: node labels a node must have, all of them, to run it (the claim rule)."""

    name: str
    url: str
    options: dict[str, str] = field(default_factory=dict)
    added_at: float = 0.0  # time.time() when added
    requires: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("camera name", self.name)
        if not self.url:
            raise ValueError(f"camera {self.name!r}: empty URL")
        check_requires(f"camera {self.name!r} requires", self.requires)


@dataclass(frozen=True)
class CameraStatus:
    """What the node running a camera last reported of it."""

    frames_per_s: float = 0.0
    frames: int = 0
    drops: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class Lease:
    camera: str
    node: str
    instance: str  # which start of the node (a node restarted under the same name is another holder)
    acquired_at: float  # time.time()
    renewed_at: float
    status: CameraStatus = field(default_factory=CameraStatus)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    instance: str
    capacity: int  # cameras it may hold now (a node running jobs offers fewer)
    held: int
    started_at: float  # time.time()
    renewed_at: float
    jobs: tuple[str, ...] = ()  # the ids of the offline jobs it runs
    ready: int = 0  # warm standby pipelines waiting for a camera (the claim rule prefers them)
    host: str = ""  # where it runs (socket.gethostname()) and its pid: what a namesake's error names
    pid: int = 0
    labels: dict[str, str] = field(default_factory=dict)  # what cameras' requirements are matched against


@dataclass(frozen=True)
class LeaseEvent:
    kind: Literal["acquired", "lost", "released", "updated"]
    camera: Camera
    at: float  # time.monotonic() of this process when it happened
    revision: int = 0  # the lease's KV revision when acquired
    reason: str = ""


@dataclass(frozen=True)
class CameraRow:
    """One line of `fleet status`: a camera and, if some node runs it, its lease."""

    camera: Camera
    lease: Lease | None


# ---------------------------------------------------------------------------- buckets


def _kv_configs(config: FleetConfig) -> list[api.KeyValueConfig]:
    leases = config.leases
    marker = max(1.0, leases.ttl_s)  # the server's minimum marker TTL is one second
    return [
        api.KeyValueConfig(bucket=leases.cameras_bucket, history=1, replicas=config.replicas, direct=True),
        api.KeyValueConfig(bucket=leases.leases_bucket, history=1, ttl=leases.ttl_s, limit_marker_ttl=marker,
                           replicas=config.replicas, direct=True),
        api.KeyValueConfig(bucket=leases.nodes_bucket, history=1, ttl=leases.ttl_s, limit_marker_ttl=marker,
                           replicas=config.replicas, direct=True),
    ]


async def _ensure(client: FleetClient) -> tuple[KeyValue, KeyValue, KeyValue]:
    """The three buckets, made or brought to the config; a call made while the cluster elects a
    leader (or another node makes the buckets) waits it out, up to leases.change_timeout_s."""
    async def once() -> tuple[KeyValue, KeyValue, KeyValue]:
        cams, leases, nodes = [await client.ensure_kv(c) for c in _kv_configs(client.config)]
        return cams, leases, nodes
    return await retrying(once, client.config.leases.change_timeout_s, "the lease buckets")


def ensure_lease_buckets(client: FleetClient) -> None:
    """Create the cameras, leases and nodes buckets, or bring their settings to the config's."""
    client.run(_ensure(client))


def _decode_all(cls: type, snapshot: Mapping[str, tuple[int, bytes]], bucket: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (_, value) in snapshot.items():
        try:
            out[stream_from_token(key)] = records.unpack(cls, value, f"{bucket}/{key}")
        except (ValueError, records.RecordError) as exc:
            log.warning("skipping %s/%s: %s", bucket, key, exc)
    return out


# ---------------------------------------------------------------------------- admin


class CameraRegistry:
    """Add, replace, remove and list the fleet's cameras; what runs where (`status`).

    Every call waits out a cluster that does not answer (a bucket just made, whose leader does
    not serve its subject yet; a leader election after a server's death), asking again for up to
    `leases.change_timeout_s`. A read lists every change acknowledged before it began, whichever
    server it goes through (`kv_snapshot`)."""

    def __init__(self, client: FleetClient) -> None:
        self.client = client
        self.config: LeaseConfig = client.config.leases

    def ensure(self) -> None:
        self.client.run(_ensure(self.client))

    def add(self, name: str, url: str, options: Mapping[str, str] | None = None, replace: bool = False,
            requires: Mapping[str, str] | None = None) -> Camera:
        """Add a camera (CameraExists if the name is taken, unless replace: then its URL, options and
        requirements change); requires: the node labels a node needs to run it."""
        camera = Camera(name, url, dict(options or {}), added_at=time.time(), requires=dict(requires or {}))
        self.client.run(self._add(camera, replace))
        return camera

    def remove(self, name: str) -> None:
        self.client.run(self._remove(check_name("camera name", name)))

    def cameras(self) -> list[Camera]:
        cameras = self.client.run(self._retried(lambda: self._read(Camera, self.config.cameras_bucket), "the cameras"))
        return sorted(cameras.values(), key=lambda c: c.name)

    def nodes(self) -> list[NodeInfo]:
        nodes = self.client.run(self._retried(lambda: self._read(NodeInfo, self.config.nodes_bucket), "the nodes"))
        return sorted(nodes.values(), key=lambda n: n.name)

    def status(self) -> list[CameraRow]:
        cameras, leases = self.client.run(self._retried(self._status, "the status"))  # one view of both
        return [CameraRow(cameras[name], leases.get(name)) for name in sorted(cameras)]

    async def _retried(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        return await retrying(call, self.config.change_timeout_s, what)

    async def _cameras_kv(self) -> KeyValue:
        bucket = self.config.cameras_bucket  # its lookup is a JetStream API request too
        return await self._retried(lambda: self.client.js.key_value(bucket), bucket)

    async def _add(self, camera: Camera, replace: bool) -> None:
        kv = await self._cameras_kv()
        value = records.pack(camera)
        key = stream_token(camera.name)
        if replace:
            await self._retried(lambda: kv.put(key, value), f"camera {camera.name}: put")
            return
        tries = 0

        async def create() -> None:
            nonlocal tries
            tries += 1
            try:
                await kv.create(key, value)
            except nats.js.errors.KeyWrongLastSequenceError:
                # An earlier try that went unanswered may have stored it: this very record is no clash.
                if tries > 1 and (await kv.get(key)).value == value:
                    return
                raise CameraExists(f"camera {camera.name!r} already exists (replace it to change its URL)") from None

        await self._retried(create, f"camera {camera.name}: create")

    async def _remove(self, name: str) -> None:
        kv = await self._cameras_kv()
        key = stream_token(name)
        try:
            await self._retried(lambda: kv.get(key), f"camera {name}: read")
        except nats.js.errors.KeyNotFoundError:
            raise CameraNotFound(f"no camera {name!r} in the fleet") from None
        await self._retried(lambda: kv.delete(key), f"camera {name}: delete")

    async def _read(self, cls: type, bucket: str) -> dict[str, Any]:
        snapshot = await kv_snapshot(self.client, bucket)
        return _decode_all(cls, snapshot, bucket)

    async def _status(self) -> tuple[dict[str, Camera], dict[str, Lease]]:
        return (await self._read(Camera, self.config.cameras_bucket),
                await self._read(Lease, self.config.leases_bucket))


# ---------------------------------------------------------------------------- the plan


def plan_claims(free: list[str], nodes: Mapping[str, tuple[int, int]], previous: Mapping[str, str] | None = None,
                ready: Mapping[str, int] | None = None, cold: Collection[str] = (),
                labels: Mapping[str, Mapping[str, str]] | None = None,
                requires: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, str]:
    """camera -> node for the free cameras; nodes: name -> (cameras held, capacity); previous: camera -> the
    node that held it last (the same start of it); ready: node -> its warm standbys; cold: cameras no
    standby can take (planned by load alone); labels: node -> its labels; requires: camera -> the labels it
    needs. A camera no node with room satisfies is left out. See the module docstring."""
    load = {name: held for name, (held, _) in nodes.items()}
    warm = {name: (ready or {}).get(name, 0) for name in nodes}
    fits = {camera: [node for node in nodes
                     if satisfies((labels or {}).get(node, {}), (requires or {}).get(camera, {}))]
            for camera in free}
    plan: dict[str, str] = {}
    for camera in sorted(free):
        node = (previous or {}).get(camera)
        if node is not None and node in fits[camera] and load[node] < nodes[node][1]:
            plan[camera] = node
            load[node] += 1
    # the most constrained first: the one node that can run a camera is not filled by cameras any node can run
    for camera in sorted((c for c in free if c not in plan), key=lambda c: (len(fits[c]), c)):
        room = [n for n in fits[camera] if load[n] < nodes[n][1]]
        if not room:
            continue
        takes_warm = camera not in cold
        best = min(room, key=lambda n: (takes_warm and warm[n] <= 0, load[n] / nodes[n][1], load[n], n))
        plan[camera] = best
        load[best] += 1
        warm[best] -= takes_warm
    return plan


# ---------------------------------------------------------------------------- the node's side


@dataclass
class _Held:
    camera: Camera
    revision: int
    acquired_at: float  # time.time()
    renewed_sent: float  # loop time when the last successful renewal was sent


@dataclass
class _Entry:
    """The latest revision of a key as this node knows it; value None: deleted or expired.

    last: the latest value it had (for a lease: who held the camera before it came free)."""

    revision: int
    value: bytes | None
    last: bytes | None = None


def _advance(mirror: dict[str, _Entry], key: str, revision: int, value: bytes | None) -> None:
    """Record a newer revision of `key` (an older one, from a lagging watch, changes nothing)."""
    current = mirror.get(key)
    if current is not None and revision < current.revision:
        return
    last = value if value is not None else (current.value or current.last if current is not None else None)
    mirror[key] = _Entry(revision, value, last)


class LeaseManager:
    """One node's leases: claims cameras within `capacity`, renews them, reports what changes.

        manager = LeaseManager(client, node="host-a", capacity=8, labels={"site": "lobby"})
        manager.start()                     # buckets made if missing; returns once it has seen the fleet
        for event in manager.events(timeout_s=1.0):
            ...                             # start / stop / restart cameras
        manager.report("cam1", CameraStatus(frames_per_s=24.8, drops=3))
        manager.stop()                      # releases every lease at once (others need not wait for the TTL)
    """

    def __init__(self, client: FleetClient, node: str, capacity: int, labels: Mapping[str, str] | None = None) -> None:
        check_name("node name", node)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity: expected a number of cameras >= 0, got {capacity!r}")
        self.client = client
        self.config: LeaseConfig = client.config.leases
        self.node = node
        self.capacity = capacity
        self.labels = check_labels("node labels", labels or {})  # fixed for the manager's life: in every presence
        self.instance = secrets.token_hex(6)
        self.started_at = time.time()
        self.error: BaseException | None = None  # why the manager's loop ended, if it did
        self._events: queue.Queue[LeaseEvent] = queue.Queue()
        self._held: dict[str, _Held] = {}
        self._lapsed: set[str] = set()  # held cameras whose lease lapsed while the bucket elected a leader
        self._unanswered_at = -math.inf  # loop time of the last write of this node the cluster did not answer
        # camera -> loop times of the first and the latest claim of it that went unanswered (it may be stored)
        self._claims_unanswered: dict[str, tuple[float, float]] = {}
        self._answered_sent = -math.inf  # loop time when the latest request the cluster answered was sent
        self._status: dict[str, CameraStatus] = {}
        self._cameras: dict[str, _Entry] = {}
        self._leases: dict[str, _Entry] = {}
        self._nodes: dict[str, _Entry] = {}
        self._free_since: dict[str, float] = {}
        self._skipped: set[tuple[str, int]] = set()
        self._presence_sent = -math.inf
        self._presence_failing_since: float | None = None  # loop time of the first unanswered write of an outage
        self._presence_written: tuple[int, int, tuple[str, ...], int] | None = None
        self._presence_revision = 0  # of its latest presence write
        self._namesakes_seen: set[str] = set()  # instances of later starts under its name, warned of
        self._claims_from = -math.inf  # loop time before which it claims nothing (a namesake may live)
        self._jobs: tuple[str, ...] = ()
        self._ready_standbys = 0
        # the nodes' presences at the last tick, and those that have left it since (expired, deleted,
        # or replaced by another start under the same name): whose jobs may have lost their holder
        self._nodes_seen: dict[str, NodeInfo] = {}
        self._departures: queue.Queue[NodeInfo] = queue.Queue()
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._release_on_stop = True
        self._ready = threading.Event()
        self._task: concurrent.futures.Future[None] | None = None
        self._kv_leases: KeyValue  # set by the loop before its first tick
        self._kv_nodes: KeyValue

    @staticmethod
    def check_interval(config: LeaseConfig) -> float:
        """How often a node checks the time since each lease's last renewal, and asks the cluster for
        a sign of life, apart from its ticks (a tick may wait seconds on a write nobody answers)."""
        return config.renew_interval_s / 4

    # ------------------------------------------------------------------ sync facade

    def start(self, timeout_s: float = 30.0) -> None:
        if self._task is not None:
            raise RuntimeError("LeaseManager already started")
        self._task = self.client.spawn(self._main())
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self._task.done():
                self._task.result()  # raises the loop's error
            if time.monotonic() > deadline:
                self._task.cancel()
                raise FleetError(f"lease manager of {self.node!r}: no view of the fleet after {timeout_s} s")

    def events(self, timeout_s: float | None = 0.0) -> list[LeaseEvent]:
        """What happened since the last call; waits up to timeout_s for the first event (None: forever)."""
        out: list[LeaseEvent] = []
        try:
            if timeout_s is None or timeout_s > 0:
                out.append(self._events.get(timeout=timeout_s))
            while True:
                out.append(self._events.get_nowait())
        except queue.Empty:
            pass
        return out

    def held(self) -> dict[str, Camera]:
        """The cameras this node holds now, by name."""
        return {name: held.camera for name, held in list(self._held.items())}

    def report(self, camera: str, status: CameraStatus) -> None:
        """What `fleet status` shows for a camera this node runs; written with the next renewal."""
        self._status[camera] = status

    def set_capacity(self, capacity: int) -> None:
        """Cameras this node may hold from now on (a node busy with jobs offers fewer). Cameras held
        beyond it are kept, not released: only new claims wait for room."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity: expected a number of cameras >= 0, got {capacity!r}")
        if capacity != self.capacity:
            self.capacity = capacity
            self._poke()

    def set_jobs(self, jobs: Sequence[str]) -> None:
        """The offline jobs this node runs, for its presence record (`fleet status`, `fleet jobs`)."""
        jobs = tuple(jobs)
        if jobs != self._jobs:
            self._jobs = jobs
            self._poke()

    def set_ready(self, standbys: int) -> None:
        """Warm standby pipelines this node has waiting for a camera, for its presence record: the
        claim rule gives free cameras to such nodes first."""
        if isinstance(standbys, bool) or not isinstance(standbys, int) or standbys < 0:
            raise ValueError(f"standbys: expected a number of pipelines >= 0, got {standbys!r}")
        if standbys != self._ready_standbys:
            self._ready_standbys = standbys
            self._poke()

    def release_all(self, reason: str = "node draining", timeout_s: float = 10.0) -> None:
        """Give every lease back now and claim nothing more (capacity 0); the node stays in the fleet
        (its presence record, with its jobs) until stop()."""
        self.capacity = 0
        if self._task is not None and not self._task.done():
            self.client.run(self._release_all(reason), timeout_s=timeout_s)

    def live_nodes(self) -> dict[str, str]:
        """node name -> instance, of every presence in this node's view at its last tick (its own included)."""
        return {name: info.instance for name, info in self._nodes_seen.items()} | {self.node: self.instance}

    def answered_for(self) -> float:
        """Seconds since a write of this node last went unanswered (a server's death, a leader election,
        a cut link: what makes other nodes' presences and states fall silent too); inf if none did."""
        return time.monotonic() - self._unanswered_at  # the loop's clock is time.monotonic()

    def departed(self) -> list[NodeInfo]:
        """The last presence of each start of a node that has left the view since the last call: its
        presence expired or was deleted, or a restart under its name replaced it. The jobs it named
        may have no live holder (`JobWorker.reclaim`)."""
        out: list[NodeInfo] = []
        try:
            while True:
                out.append(self._departures.get_nowait())
        except queue.Empty:
            return out

    def camera_count(self) -> int:
        """Cameras in the fleet that this node could run (it satisfies their requirements), as it sees it now."""
        return sum(1 for camera in self._decoded(self._cameras, Camera).values() if self._fits(camera))

    def unclaimed(self) -> list[str]:
        """Cameras that no node holds and this node could run, as this node sees the fleet now (one it
        does not satisfy waits for another node, not for this one's room)."""
        leases = self._decoded(self._leases, Lease)
        return sorted(name for name, camera in self._decoded(self._cameras, Camera).items()
                      if name not in leases and name not in self._held and self._fits(camera))

    def _fits(self, camera: Camera) -> bool:
        return satisfies(self.labels, camera.requires)

    def _poke(self) -> None:
        """Wake the loop for a tick now (from any thread)."""
        if self._task is not None and not self._task.done():
            self.client.spawn(self._request_tick())

    def stop(self, release: bool = True, timeout_s: float = 10.0) -> None:
        """End the manager; release=True gives every lease back now (False: let them expire, as a crash would)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._release_on_stop = release
        try:
            if not task.done():
                self.client.run(self._request_stop(), timeout_s=timeout_s)
            task.result(timeout_s)
        except concurrent.futures.TimeoutError:
            task.cancel()
            log.warning("node %s: lease loop did not stop in %s s; its leases expire by themselves",
                        self.node, timeout_s)
        except (FleetError, concurrent.futures.CancelledError):
            task.cancel()
        except Exception as exc:  # noqa: BLE001  (the loop's own failure, already kept in self.error)
            log.debug("lease loop of %s ended with %s", self.node, exc)

    # ------------------------------------------------------------------ the loop

    async def _main(self) -> None:
        try:
            kv_cams, kv_leases, kv_nodes = await _ensure(self.client)
            self._kv_leases, self._kv_nodes = kv_leases, kv_nodes
            self._wake = asyncio.Event()
            synced = [asyncio.Event() for _ in range(3)]
            watchers = [asyncio.create_task(self._watch(kv, mirror, done))
                        for kv, mirror, done in zip((kv_cams, kv_leases, kv_nodes),
                                                    (self._cameras, self._leases, self._nodes), synced)]
            watchers.append(asyncio.create_task(self._resync()))
            watchers.append(asyncio.create_task(self._watchdog()))
            try:
                for done in synced:
                    await done.wait()
                self._hold_claims_for_a_namesake()
                await self._tick()
                self._ready.set()
                while True:
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.config.renew_interval_s / 2)
                    except asyncio.TimeoutError:
                        pass
                    self._wake.clear()
                    if self._stopping:
                        break
                    await self._tick()
                if self._release_on_stop:
                    await self._shutdown()
            finally:
                for task in watchers:
                    task.cancel()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            log.error("lease manager of %s stopped: %s", self.node, exc, exc_info=exc)
            for name in list(self._held):
                self._lose(name, f"lease manager failed: {exc}")
            raise

    async def _watch(self, kv: KeyValue, mirror: dict[str, _Entry], synced: asyncio.Event) -> None:
        watcher = await retrying(lambda: kv.watchall(inactive_threshold=WATCH_INACTIVE_S), self.config.change_timeout_s,
                                 "a watch")
        try:
            async for entry in watcher:
                if entry is None:
                    synced.set()
                    continue
                deleted = entry.operation in (KV_DEL, KV_PURGE)
                _advance(mirror, entry.key, entry.revision, None if deleted else (entry.value or b""))
                if entry.delta == 0:
                    synced.set()
                if self._wake is not None:
                    self._wake.set()
        finally:
            await watcher.stop()

    async def _tick(self) -> None:
        now = asyncio.get_running_loop().time()
        cameras = self._decoded(self._cameras, Camera)
        self._check_namesake()
        self._note_departures()
        await self._presence(now)
        await self._renew(now, cameras)
        await self._claim(now, cameras)

    def _decoded(self, mirror: dict[str, _Entry], cls: type) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, entry in list(mirror.items()):
            if entry.value is None:
                continue
            try:
                out[stream_from_token(key)] = records.unpack(cls, entry.value, key)
            except (ValueError, records.RecordError) as exc:
                if (key, entry.revision) not in self._skipped:  # once, not at every tick
                    self._skipped.add((key, entry.revision))
                    log.warning("skipping %s: %s", key, exc)
        return out

    async def _presence(self, now: float) -> None:
        written = (len(self._held), self.capacity, self._jobs, self._ready_standbys)
        due = now - self._presence_sent >= self.config.renew_interval_s or self._presence_written != written
        if not due:
            return
        info = NodeInfo(self.node, self.instance, self.capacity, len(self._held), self.started_at, time.time(),
                        self._jobs, self._ready_standbys, socket.gethostname(), os.getpid(), self.labels)
        try:
            self._presence_revision = await self.client.on_this_connection(
                self._kv_nodes.put(stream_token(self.node), records.pack(info)))
        except UNAVAILABLE as exc:
            self._unanswered_at = asyncio.get_running_loop().time()
            if self._presence_failing_since is None:  # said once an outage, not every renew_interval_s
                self._presence_failing_since = now
                log.info("node %s: presence not written (%s); trying again every %g s", self.node, exc,
                         self.config.renew_interval_s)
            return
        if self._presence_failing_since is not None:
            log.info("node %s: presence written again, %.0f s after the first failure", self.node,
                     now - self._presence_failing_since)
            self._presence_failing_since = None
        self._presence_sent, self._presence_written = now, written

    def _note_departures(self) -> None:
        nodes = self._decoded(self._nodes, NodeInfo)
        for name, seen in self._nodes_seen.items():
            now = nodes.get(name)
            if (now is None or now.instance != seen.instance) and seen.instance != self.instance:
                self._departures.put(seen)
        self._nodes_seen = nodes  # replaced whole: live_nodes() reads it from other threads

    def _presence_under_own_name(self) -> tuple[int, NodeInfo] | None:
        """(revision, record) of the latest presence under this node's name in the view, whoever wrote it."""
        entry = self._nodes.get(stream_token(self.node))
        if entry is None or entry.value is None:
            return None
        try:
            return entry.revision, records.unpack(NodeInfo, entry.value)
        except records.RecordError:
            return None

    def _hold_claims_for_a_namesake(self) -> None:
        """At the start: a presence under this node's name, of another start, renewed within ttl_s, is
        either this node's previous start (killed, and started again at once) or a live node under
        the same name. No claim until that presence would have expired were its node dead (a live
        one renews it within ttl_s, however loaded its host: it would lose its own leases otherwise),
        and at least two renew intervals, so that a namesake is found (`_check_namesake`) before it
        claimed anything."""
        found = self._presence_under_own_name()
        if found is None:
            return
        _, other = found
        age = time.time() - other.renewed_at
        if other.instance != self.instance and age < self.config.ttl_s:
            hold = max(2 * self.config.renew_interval_s, self.config.ttl_s - age)
            self._claims_from = asyncio.get_running_loop().time() + hold

    def _check_namesake(self) -> None:
        """A presence under this node's name written after its own latest one, by another start: two
        live nodes share a name (their cameras' leases, jobs and metrics could not be told apart).
        The later start stops with NodeNameInUse; the earlier one says so once and goes on."""
        found = self._presence_under_own_name()
        if self._presence_revision == 0 or found is None or found[0] <= self._presence_revision:
            return
        _, other = found
        if other.instance == self.instance:
            return
        where = f"on host {other.host or '?'}, pid {other.pid or '?'}, " \
                f"started {time.time() - other.started_at:.0f} s ago"
        if (other.started_at, other.instance) < (self.started_at, self.instance):
            raise NodeNameInUse(f"node name {self.node!r} is in use by another live node ({where}); give each node "
                                f"its own --name")
        if other.instance not in self._namesakes_seen:
            self._namesakes_seen.add(other.instance)
            log.warning("node %s: another node started under this name (%s); it stops, this one goes on",
                        self.node, where)

    async def _renew(self, now: float, cameras: dict[str, Camera]) -> None:
        for name, held in list(self._held.items()):
            key = stream_token(name)
            seen = self._leases.get(key)
            # the time now, not the tick's start: a write of this tick may have waited seconds for an answer
            lapsed = asyncio.get_running_loop().time() - held.renewed_sent >= self.config.ttl_s
            if seen is not None and seen.revision > held.revision:
                if seen.value is None and lapsed:  # expired while the bucket could not be written
                    await self._take_back(name, held, seen.revision, now)
                else:
                    self._lose(name, "taken by another node" if seen.value is not None else "expired or deleted")
                continue
            camera = cameras.get(name)
            if camera is None:
                await self._release(name, "camera removed")
                continue
            if not self._fits(camera):
                await self._release(name, f"camera requires {describe_labels(camera.requires)}, which node "
                                          f"{self.node} does not offer")
                continue
            if camera != held.camera:
                changed = (camera.url, camera.options) != (held.camera.url, held.camera.options)
                held.camera = camera
                if changed:  # a change of its requirements alone, still satisfied here, leaves the run alone
                    self._events.put(LeaseEvent("updated", camera, time.monotonic(), held.revision,
                                                "URL or options changed"))
            if now - held.renewed_sent < self.config.renew_interval_s:
                continue
            lease = Lease(name, self.node, self.instance, held.acquired_at, time.time(),
                          self._status.get(name, CameraStatus()))
            try:
                held.revision = await self.client.on_this_connection(
                    self._kv_leases.update(key, records.pack(lease), last=held.revision))
                held.renewed_sent = now
            except nats.js.errors.KeyWrongLastSequenceError:
                if lapsed:
                    try:
                        await self._refresh(key)
                    except (*UNAVAILABLE, nats.errors.Error) as exc:
                        self._unanswered(name, held, exc)
                        continue
                    seen = self._leases.get(key)
                    if seen is not None and seen.value is None:
                        await self._take_back(name, held, seen.revision, now)
                        continue
                self._lose(name, "taken by another node or expired")
            except UNAVAILABLE as exc:
                self._unanswered_at = asyncio.get_running_loop().time()
                self._unanswered(name, held, exc)

    def _unanswered(self, name: str, held: _Held, exc: BaseException) -> None:
        """A renewal the cluster did not answer. Past ttl_s the lease has lapsed on the server, and
        another node may claim the camera once the bucket takes writes again; but while the
        cluster answers this node and the bucket answers nobody (a leader election), nobody can:
        the camera goes on for election_grace_s more, to be taken back when the bucket answers."""
        self._overdue(name, held, type(exc).__name__)

    def _overdue(self, name: str, held: _Held, why: str) -> None:
        """Give up a camera whose lease was not renewed for ttl_s (on this node's clock, from when its
        last answered renewal was sent: the server's ttl_s runs from when it stored it, later), unless
        the cluster answers this node (a leader election: kept election_grace_s more, above). A node
        the cluster does not answer cannot tell a partition from anything else, and once the lease
        expires another node may claim the camera: it stops it first."""
        now = asyncio.get_running_loop().time()
        unrenewed = now - held.renewed_sent
        if unrenewed < self.config.ttl_s:
            return
        if self._in_touch(now) and unrenewed < self.config.ttl_s + self.config.election_grace_s:
            if name not in self._lapsed:
                self._lapsed.add(name)
                log.info("node %s: lease of %s not renewed for %.1f s (%s): kept while the cluster elects",
                         self.node, name, unrenewed, why)
            return
        self._lose(name, f"not renewed for {unrenewed:.1f} s ({why})")

    def _in_touch(self, now: float) -> bool:
        """Whether the cluster answered a request of this node sent lately. A lease's deadline comes
        ttl_s after its last answered renewal, which was sent no earlier than renew_interval_s (one
        period) before the cut, so a node cut off has heard nothing for ttl_s - renew_interval_s then:
        more than half of that is silence enough to tell it from an election, where the probes sent
        every check_interval are answered."""
        return now - self._answered_sent <= (self.config.ttl_s - self.config.renew_interval_s) / 2

    async def _probe(self) -> None:
        """One request any server answers (a direct get of this node's presence, which any replica of
        the nodes bucket serves, even while a bucket elects its leader): a sign of life, or none."""
        sent = asyncio.get_running_loop().time()
        bucket = self.config.nodes_bucket
        try:
            await kv_last(self.client, bucket, stream_token(self.node))
        except _SILENCE:
            return
        except nats.errors.Error:
            pass  # refused, not found, no responders: the server answered all the same
        self._answered_sent = max(self._answered_sent, sent)

    async def _watchdog(self) -> None:
        """A probe of the cluster every check_interval, and each held lease checked at its deadline
        (ttl_s after its last answered renewal was sent) and every check_interval past it. Apart from
        the ticks, which wait on each write for up to nats.request_timeout_s when nobody answers."""
        loop = asyncio.get_running_loop()
        interval = self.check_interval(self.config)
        probes: set[asyncio.Task[None]] = set()
        next_probe = loop.time()
        while True:
            now = loop.time()
            if now >= next_probe:
                if self._held:  # only a node that holds cameras asks
                    probe = asyncio.create_task(self._probe())
                    probes.add(probe)  # kept until done (the loop holds tasks weakly)
                    probe.add_done_callback(probes.discard)
                next_probe = now + interval  # also when it holds none: else this loop would never sleep
            for name, held in list(self._held.items()):
                if self._taken(name, held):
                    self._lose(name, "taken by another node")
                else:
                    self._overdue(name, held, "no answer")
            deadlines = [d for held in list(self._held.values()) if (d := held.renewed_sent + self.config.ttl_s) > now]
            await asyncio.sleep(max(0.0, min([next_probe, *deadlines]) - loop.time()))

    def _taken(self, name: str, held: _Held) -> bool:
        """Whether the view shows the camera's lease held by another node (or another start of this one).
        Checked apart from the ticks: a node that moved to another server while a write of its tick
        waits for an answer that went with the old connection is answered again (its probes), keeps
        its lapsed leases as in an election, and must not run a camera another node claimed meanwhile."""
        seen = self._leases.get(stream_token(name))
        if seen is None or seen.value is None or seen.revision <= held.revision:
            return False
        try:
            return records.unpack(Lease, seen.value).instance != self.instance
        except records.RecordError:
            return False

    async def _take_back(self, name: str, held: _Held, last: int, now: float) -> None:
        """Claim again a lease that lapsed while the bucket could not be written and that no other
        node has taken since (the key is free at revision `last`): the camera's run goes on."""
        lease = Lease(name, self.node, self.instance, held.acquired_at, time.time(),
                      self._status.get(name, CameraStatus()))
        try:
            held.revision = await self.client.on_this_connection(
                self._kv_leases.update(stream_token(name), records.pack(lease), last=last))
        except nats.js.errors.KeyWrongLastSequenceError:
            self._lose(name, "taken by another node after it lapsed")
            return
        except UNAVAILABLE as exc:
            self._unanswered_at = asyncio.get_running_loop().time()
            self._unanswered(name, held, exc)
            return
        held.renewed_sent = now
        self._lapsed.discard(name)
        log.info("node %s: took %s back after its lease lapsed", self.node, name)

    async def _claim(self, now: float, cameras: dict[str, Camera]) -> None:
        leases = self._decoded(self._leases, Lease)
        self._adopt_unanswered(now, cameras, leases)
        free = [name for name in cameras if name not in leases and name not in self._held]
        for name in list(self._free_since):
            if name not in free:
                del self._free_since[name]
        for name in free:
            self._free_since.setdefault(name, now)
        room = self.capacity - len(self._held)
        if not free or room <= 0 or now < self._claims_from:
            return
        previous = self._previous_holders(free)
        if now - self._unanswered_at < self.config.claim_grace_s:
            # just after an outage (a leader election) the cameras that lapsed in it go back to their
            # holders, which take them back at their next tick: none of those is claimed until they
            # had the time. A camera that never had a holder waits for nobody (one added right after
            # a server's death, while the nodes bucket elects its leader and presence goes unwritten)
            free = [name for name in free if name not in previous]
            if not free:
                return
        infos = [info for info in self._decoded(self._nodes, NodeInfo).values() if info.capacity > 0]
        nodes = {info.name: (sum(1 for lease in leases.values() if lease.node == info.name), info.capacity)
                 for info in infos}
        nodes[self.node] = (len(self._held), self.capacity)
        instances = {info.name: info.instance for info in infos} | {self.node: self.instance}
        ready = {info.name: info.ready for info in infos} | {self.node: self._ready_standbys}
        labels = {info.name: info.labels for info in infos} | {self.node: self.labels}
        # a camera goes back to the very start of the node that held it, not to a restart of it
        # under the same name: that one runs nothing of it, and may be the coldest node there is
        same = {camera: node for camera, (node, instance) in previous.items() if instances.get(node) == instance}
        # a standby runs live cameras only (Spare.fits): one read offline starts cold wherever it goes
        cold = {name for name in free if cameras[name].options.get("policy") == "offline"}
        plan = plan_claims(free, nodes, same, ready, cold, labels, {name: cameras[name].requires for name in free})
        planned = [name for name in sorted(free) if plan.get(name) == self.node]
        # an orphan only where it can run: a node that cannot open a camera would hold it failing for ever
        orphans = [name for name in sorted(free) if name not in planned and self._fits(cameras[name])
                   and now - self._free_since[name] >= self.config.claim_grace_s]
        for name in (planned + orphans)[:room]:
            await self._try_claim(name, cameras[name], now)

    async def _try_claim(self, name: str, camera: Camera, now: float) -> None:
        key = stream_token(name)
        seen = self._leases.get(key)
        last = seen.revision if seen is not None else 0
        stamp = time.time()
        lease = Lease(name, self.node, self.instance, stamp, stamp, CameraStatus())
        try:
            revision = await self.client.on_this_connection(self._kv_leases.update(key, records.pack(lease), last=last))
        except nats.js.errors.KeyWrongLastSequenceError:
            try:  # our view was behind (or an expiry marker itself expired)
                await self._refresh(key)
            except (*UNAVAILABLE, nats.errors.Error) as exc:  # the next resync reads it again
                log.info("node %s: claim of %s refused, its lease not read again (%s)", self.node, name, exc)
            return
        except UNAVAILABLE as exc:
            self._unanswered_at = asyncio.get_running_loop().time()
            first, _ = self._claims_unanswered.get(name, (now, now))
            self._claims_unanswered[name] = (first, now)
            log.info("node %s: claim of %s not answered (%s)", self.node, name, exc)
            return
        self._claims_unanswered.pop(name, None)
        self._held[name] = _Held(camera, revision, stamp, now)
        self._events.put(LeaseEvent("acquired", camera, time.monotonic(), revision))

    def _adopt_unanswered(self, now: float, cameras: dict[str, Camera], leases: dict[str, Lease]) -> None:
        """A claim that went unanswered (a server's death, a stalled server) may have been stored: a
        lease of this very start of the node, in the view, is held from now on (renewed from the next
        tick), instead of being left to expire while nobody runs the camera. Given up ttl_s after the
        latest such claim: by then it expired, or was never stored."""
        for name, (first, latest) in list(self._claims_unanswered.items()):
            lease, camera = leases.get(name), cameras.get(name)
            if lease is not None and lease.instance == self.instance and camera is not None:
                del self._claims_unanswered[name]
                if name not in self._held:
                    revision = self._leases[stream_token(name)].revision
                    # renewed_sent: the first try's time, at or before the write's, so the renewal is not late
                    self._held[name] = _Held(camera, revision, lease.acquired_at, first)
                    self._events.put(LeaseEvent("acquired", camera, time.monotonic(), revision))
                    log.info("node %s: a claim of %s that went unanswered was stored: held", self.node, name)
            elif now - latest >= self.config.ttl_s:
                del self._claims_unanswered[name]

    def _previous_holders(self, free: list[str]) -> dict[str, tuple[str, str]]:
        """camera -> (node, instance) of its last lease, for the free cameras that had one."""
        out = {}
        for name in free:
            entry = self._leases.get(stream_token(name))
            if entry is not None and entry.last is not None:
                try:
                    lease = records.unpack(Lease, entry.last)
                except records.RecordError:
                    continue
                out[name] = (lease.node, lease.instance)
        return out

    async def _refresh(self, key: str) -> None:
        """Read one lease key directly (any replica answers, even while the bucket elects a leader)."""
        bucket = self.config.leases_bucket
        try:
            msg = await self.client.on_this_connection(kv_last(self.client, bucket, key))
        except nats.js.errors.NotFoundError:  # no message at all (expired, and its marker too): claim with 0
            current = self._leases.get(key)
            if current is not None:
                self._leases[key] = _Entry(0, None, current.value or current.last)
            return
        if msg.seq is None:
            return
        _advance(self._leases, key, msg.seq, None if ends_key(msg.headers) else (msg.data or b""))

    async def _catch_up(self, bucket: str, mirror: dict[str, _Entry]) -> None:
        """Read the bucket's messages after the latest revision this node has of it, in stream order,
        by direct gets (any replica answers, even while the bucket elects a leader): what a lagging
        watch has not delivered yet. At most CATCH_UP_MAX of them; the rest at the next resync."""
        after = max((entry.revision for entry in list(mirror.values())), default=0)
        async for key, revision, value in kv_after(self.client, bucket, after, direct=True, limit=CATCH_UP_MAX):
            _advance(mirror, key, revision, value)

    async def _resync(self) -> None:
        """Now and then, catch up the cameras and nodes buckets and re-read every camera's lease key:
        a watch whose server died can lag for many seconds (until its missed heartbeats make it
        start again), and a camera must not stay unclaimed or running, nor a plan be made from a
        stale list of nodes, because this node's view is stale."""
        def check(results: Sequence[object]) -> None:
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, (*UNAVAILABLE, nats.errors.Error)):
                    raise result

        while True:
            await asyncio.sleep(self.config.ttl_s / 2)
            check(await asyncio.gather(self._catch_up(self.config.cameras_bucket, self._cameras),
                                       self._catch_up(self.config.nodes_bucket, self._nodes),
                                       return_exceptions=True))
            keys = [stream_token(name) for name in self._decoded(self._cameras, Camera)]  # new cameras' too
            check(await asyncio.gather(*(self._refresh(key) for key in keys), return_exceptions=True))
            if self._wake is not None:
                self._wake.set()

    def _lose(self, name: str, reason: str) -> None:
        held = self._held.pop(name, None)
        self._lapsed.discard(name)
        if held is None:
            return
        self._status.pop(name, None)
        log.warning("node %s lost camera %s: %s", self.node, name, reason)
        self._events.put(LeaseEvent("lost", held.camera, time.monotonic(), held.revision, reason))

    async def _release(self, name: str, reason: str) -> None:
        held = self._held.pop(name, None)
        if held is None:
            return
        self._status.pop(name, None)
        try:
            await self._kv_leases.delete(stream_token(name), last=held.revision)
        except (*UNAVAILABLE, nats.errors.Error) as exc:
            log.info("node %s: release of %s not acknowledged (%s); it expires by itself", self.node, name, exc)
        self._events.put(LeaseEvent("released", held.camera, time.monotonic(), held.revision, reason))

    async def _release_all(self, reason: str) -> None:
        for name in list(self._held):
            await self._release(name, reason)
        self._presence_written = None  # held and capacity changed: written at the next tick

    async def _request_tick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _request_stop(self) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake.set()

    async def _shutdown(self) -> None:
        for name in list(self._held):
            await self._release(name, "node stopping")
        try:
            await self._kv_nodes.delete(stream_token(self.node))
        except (*UNAVAILABLE, nats.errors.Error):
            pass
