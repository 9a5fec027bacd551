"""One NATS connection per process, on an asyncio loop in its own thread, with blocking calls.

nats-py is asyncio; the node, the CLI and the stage processes are synchronous. Rather than make
them async, each process that talks to the fleet opens one `FleetClient`: a daemon thread runs an
event loop that owns the connection, and synchronous code hands it coroutines (`run`) or
long-lived tasks (`spawn`). That keeps the asyncio code in the fleet modules, lets lease renewals
and job heartbeats go on while the main thread is busy with the pipeline (a blocked main thread
must not lose the node its cameras), and shares one connection, with its reconnect logic, between
leases, jobs and results.

Errors: `FleetUnavailable` when the cluster cannot be reached or does not answer in time (a
condition to wait out), `FleetError` for everything else the servers refuse.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from maskstream.pipeline.fleet.config import FleetConfig
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api
from nats.js.api import RawStreamMsg
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

__all__ = ["WATCH_INACTIVE_S", "AnswerLost", "ConnectionState", "FleetClient", "FleetError", "FleetUnavailable",
           "ends_key", "kv_after", "kv_last", "kv_snapshot", "retrying"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# A KV watch is a consumer on a server, and the server deletes it only this long after its watcher is
# gone (stopped, its process killed, or the watch started again after its server died). nats-py's
# default is 5 minutes: every `fleet status`, node restart and watch reset then left consumers behind
# for that long. A watcher cut off for longer finds its consumer gone and makes another (an ordered
# consumer starts again by itself after missed heartbeats).
WATCH_INACTIVE_S = 10.0

# JSStreamNameExistErr: the stream exists with another configuration.
_STREAM_EXISTS = 10058
# JSClusterNoPeersErrF: no servers to place a stream's replicas on (one is down, or the cluster has just
# started and has not counted every server in yet).
_NO_PEERS = 10005


class FleetError(RuntimeError):
    """The NATS cluster refused a fleet operation."""


class FleetUnavailable(FleetError):
    """The NATS cluster could not be reached, or did not answer in time."""


class AnswerLost(nats.errors.TimeoutError):
    """The connection a request went out on was replaced before its answer came: no answer will.
    A timeout come early: the request may or may not have been carried out."""

    def __str__(self) -> str:
        return "nats: the connection the request went out on was replaced"


# nats-py's ways of saying "nobody answered": worth retrying, never a bad request.
UNAVAILABLE = (
    nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError,
    nats.errors.NoServersError, nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError, nats.js.errors.ServiceUnavailableError, nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
)


@dataclass(frozen=True)
class ConnectionState:
    connected: bool
    server: str  # the URL currently connected to ("" when none)
    reconnects: int  # successful reconnects since connect
    disconnects: int
    last_error: str


class FleetClient:
    """A NATS connection on a loop thread. Make one with `FleetClient.connect(config)`; close it."""

    def __init__(self, config: FleetConfig, name: str = "maskstream") -> None:
        self.config = config
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._reconnects = 0
        self._disconnects = 0
        self._last_error = ""
        self._tls_refusal = ""  # a TLS error while connecting at start: the reason, whatever error follows it
        self._refused: asyncio.Event | None = None
        self._closing = False
        self._replaced: asyncio.Future[None] | None = None  # done when the current connection is replaced

    @classmethod
    def connect(cls, config: FleetConfig, name: str = "maskstream", timeout_s: float | None = None) -> FleetClient:
        """Connect to any of config.nats.urls within timeout_s (default: two tries at each server)."""
        client = cls(config, name)
        client._start_loop()
        nats_cfg = config.nats
        budget = timeout_s if timeout_s is not None else 2 * len(nats_cfg.urls) * (
            nats_cfg.connect_timeout_s + nats_cfg.reconnect_wait_s)
        try:
            client.run(client._connect(), timeout_s=budget)
        except FleetUnavailable:
            client.close()
            error = client._tls_refusal or client._last_error
            last = f" (last error: {error})" if error else ""
            raise FleetUnavailable(
                f"cannot connect to NATS at {', '.join(nats_cfg.urls)} within {budget:g} s{last}") from None
        except BaseException:
            client.close()
            raise
        return client

    # ------------------------------------------------------------------ sync facade

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run `coro` on the loop and wait for it; nats errors come back as FleetError/FleetUnavailable."""
        loop = self._require_loop()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("FleetClient.run called on its own loop thread: await the coroutine instead")
        future = asyncio.run_coroutine_threadsafe(_translated(coro), loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            urls = ", ".join(self.config.nats.urls)
            raise FleetUnavailable(f"no answer from NATS ({urls}) in {timeout_s} s") from None

    def spawn(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start `coro` as a task on the loop and return at once (cancel the future to stop it)."""
        return asyncio.run_coroutine_threadsafe(coro, self._require_loop())

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise FleetError("not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise FleetError("not connected")
        return self._js

    def state(self) -> ConnectionState:
        nc = self._nc
        connected = bool(nc is not None and nc.is_connected)
        server = ""
        if connected and nc is not None and nc.connected_url is not None:
            server = nc.connected_url.geturl()
        return ConnectionState(connected, server, self._reconnects, self._disconnects, self._last_error)

    def close(self) -> None:
        """Close the connection (pending publishes are flushed) and end the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            try:
                asyncio.run_coroutine_threadsafe(self._nc.close(), loop).result(10)
            except Exception as exc:  # closing a broken connection: nothing left to save
                log.debug("closing NATS connection: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def on_this_connection(self, request: Awaitable[T]) -> T:
        """Await a request (on the loop), giving it up with AnswerLost as soon as the connection it
        went out on is replaced: its answer, if any, went with the old one (a silent link that the
        pings found stale, a server that died), and waiting out nats.request_timeout_s for it would
        hold the caller past what the new connection could do meanwhile. A request made while
        disconnected goes out on the next connection and is awaited as usual."""
        task = asyncio.ensure_future(request)
        replaced = self._replaced
        if replaced is None or self._nc is None or not self._nc.is_connected:
            return await task
        waited: set[asyncio.Future[Any]] = {task, replaced}
        try:
            done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller is stopped: so is its request
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise AnswerLost()

    # ------------------------------------------------------------------ provisioning (on the loop)

    async def ensure_stream(self, config: api.StreamConfig) -> None:
        """Create the stream, or bring an existing one's limits to `config`; returns once it has a leader."""
        assert config.name is not None

        async def made() -> None:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_EXISTS:
                    raise
                await self.js.update_stream(config)

        await self._placed(made, f"stream {config.name}", config.num_replicas or 1)
        await self._wait_for_leader(config.name)

    async def _placed(self, make: Callable[[], Awaitable[T]], what: str, replicas: int) -> T:
        """make(), again while JetStream finds no servers to place the replicas on, for up to
        leases.change_timeout_s: a cluster that has just started counts its servers in over seconds,
        and one with a server down places no new stream of as many replicas as it has servers until
        that server is back. Then FleetUnavailable, saying so."""
        loop = asyncio.get_running_loop()
        timeout_s = self.config.leases.change_timeout_s
        deadline = loop.time() + timeout_s
        while True:
            try:
                return await make()
            except nats.js.errors.APIError as exc:
                if exc.err_code != _NO_PEERS:
                    raise
                if loop.time() > deadline:
                    raise FleetUnavailable(
                        f"{what}: JetStream found no servers for its {replicas} replica(s) within {timeout_s:g} s "
                        f"({exc.description}): is a server of the cluster down, or is `replicas` more than the "
                        "cluster's servers?") from exc
            await asyncio.sleep(0.25)

    async def _wait_for_leader(self, stream: str, timeout_s: float = 15.0) -> None:
        # A new replicated stream answers its first writes only once its raft group has elected a leader.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                info = await self.js.stream_info(stream)
                if info.cluster is None or info.cluster.leader:
                    return
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
                pass  # no answer while the election goes on, on a loaded host: ask again until the deadline
            except nats.js.errors.NotFoundError:
                # made (or found) a moment ago, yet "stream not found": two processes made it at once and
                # the answer came from a view that has not caught up (a node's start failed on it)
                pass
            if loop.time() > deadline:
                raise FleetUnavailable(f"stream {stream} has no leader after {timeout_s} s")
            await asyncio.sleep(0.1)

    async def ensure_kv(self, config: api.KeyValueConfig) -> KeyValue:
        """Create the bucket, or bring an existing one's TTL, size and replicas to `config`."""
        stream = f"KV_{config.bucket}"

        async def made() -> KeyValue:
            try:
                return await self.js.create_key_value(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_EXISTS:
                    raise
                info = await self.js.stream_info(stream)
                marker = config.limit_marker_ttl if config.limit_marker_ttl else None
                await self.js.update_stream(info.config.evolve(
                    max_age=config.ttl or 0, max_bytes=config.max_bytes or -1, num_replicas=config.replicas,
                    allow_direct=bool(config.direct), subject_delete_marker_ttl=marker, allow_msg_ttl=True))
                return await self.js.key_value(config.bucket)

        kv = await self._placed(made, f"bucket {config.bucket}", config.replicas)
        await self._wait_for_leader(stream)
        return kv

    # ------------------------------------------------------------------ internals

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise FleetError("the fleet client is closed")
        return self._loop

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop), return_exceptions=True))
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name=f"fleet-{self.name}", daemon=True)
        self._thread.start()
        ready.wait()

    async def _connect(self) -> None:
        cfg = self.config.nats
        auth = cfg.auth
        options: dict[str, Any] = {}
        if auth.user is not None:
            options.update(user=auth.user, password=auth.password)
        if auth.token is not None:
            options["token"] = auth.token
        if auth.nkey_seed is not None:
            options["nkeys_seed"] = str(_readable(auth.nkey_seed, "nats.auth.nkey_seed"))
        if auth.creds is not None:
            options["user_credentials"] = str(_readable(auth.creds, "nats.auth.creds"))
        context = _tls_context(self.config)
        if context is not None:
            options["tls"] = context
            if cfg.tls.hostname:
                options["tls_hostname"] = cfg.tls.hostname
        nc = NatsClient()
        self._nc = nc
        self._refused = asyncio.Event()
        # nats-py retries a refused login forever (max_reconnect_attempts=-1, so that a node rides
        # out any outage); at start a refusal is a configuration error, reported at once.
        connecting = asyncio.ensure_future(nc.connect(
            # nats-py annotates these as int but uses them as seconds for asyncio: fractions work
            servers=list(cfg.urls), name=self.name, connect_timeout=cfg.connect_timeout_s,  # type: ignore[arg-type]
            reconnect_time_wait=cfg.reconnect_wait_s,  # type: ignore[arg-type]
            # nats-py's own defaults (a ping every 120 s, 2 outstanding) leave a silent link for minutes
            ping_interval=cfg.ping_interval_s, max_outstanding_pings=cfg.max_outstanding_pings,  # type: ignore[arg-type]
            max_reconnect_attempts=-1, allow_reconnect=True,
            error_cb=self._on_error, disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
            **options))
        refused = asyncio.ensure_future(self._refused.wait())
        try:
            await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller's time is up
            await _cancel(connecting, refused)
            await nc.close()
            raise
        if connecting.done():
            refused.cancel()
            connecting.result()
            self._js = nc.jetstream(timeout=cfg.request_timeout_s)
            self._replaced = asyncio.get_running_loop().create_future()
            return
        await _cancel(connecting, refused)
        await nc.close()
        raise FleetError(f"NATS refused this client at {', '.join(cfg.urls)}: {self._last_error} "
                         f"(check nats.auth: method {auth.method!r})")

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        log.debug("NATS: %s", self._last_error)
        # A server that refuses the handshake (no client certificate, one it does not trust) sends an
        # alert and closes: on a busy host the next try, or the read, often sees only the reset.
        if isinstance(exc, ssl.SSLError) and self._js is None:
            self._tls_refusal = self._last_error
        # at login nats-py reports the server's -ERR as a plain Error carrying its text
        refused = isinstance(exc, nats.errors.AuthorizationError) or any(
            text in str(exc).lower() for text in ("authorization violation", "authentication"))
        if refused and self._js is None and self._refused is not None:
            self._refused.set()

    async def _on_disconnected(self) -> None:
        if self._closing or self._js is None:  # on close() too, and on a first connection that failed
            return
        self._disconnects += 1
        log.info("NATS: disconnected")

    async def _on_reconnected(self) -> None:
        self._reconnects += 1
        if self._replaced is not None:
            self._replaced.set_result(None)
        self._replaced = asyncio.get_running_loop().create_future()
        url = self._nc.connected_url.geturl() if self._nc and self._nc.connected_url else "?"
        log.info("NATS: reconnected to %s", url)


def ends_key(headers: Mapping[str, str] | None) -> bool:
    """A KV message that ends its key: a delete, a purge, or the server's marker (a TTL's expiry)."""
    headers = headers or {}
    return headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers


async def kv_last(client: FleetClient, bucket: str, key: str) -> RawStreamMsg:
    """One key's last message, by a direct get: any replica answers, even while the bucket elects a
    leader, but its copy may lag the latest writes. NotFoundError when the key has no message."""
    return await client.js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}", direct=True)


async def kv_after(client: FleetClient, bucket: str, after: int, *, direct: bool, limit: int | None = None,
                   through: int | None = None) -> AsyncIterator[tuple[str, int, bytes | None]]:
    """The bucket's messages after revision `after`, in stream order, one get each: (key, revision,
    value; None for a delete, a purge or the server's expiry marker). Ends after `limit` of them,
    or after the first at or past revision `through`.

    direct: any replica answers, even while the bucket elects a leader, but its copy may lag the
    latest writes; else the stream's leader does, which has every write the cluster acknowledged."""
    stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
    count = 0
    while limit is None or count < limit:
        try:
            msg = await client.js.get_msg(stream, seq=after + 1, subject=f"{prefix}>", direct=direct, next=True)
        except nats.js.errors.NotFoundError:  # nothing after it
            return
        subject = msg.subject or ""
        if msg.seq is None or msg.seq <= after or not subject.startswith(prefix):
            log.warning("reading %s: unexpected answer %s %s after %d", bucket, subject, msg.seq, after)
            return
        yield subject[len(prefix):], msg.seq, None if ends_key(msg.headers) else (msg.data or b"")
        after, count = msg.seq, count + 1
        if through is not None and after >= through:
            return


async def kv_snapshot(client: FleetClient, bucket: str) -> dict[str, tuple[int, bytes]]:
    """Every live key of a bucket: key -> (revision, value), with every write the cluster had
    acknowledged when the call began (read your writes). A watch that stalls for
    nats.request_timeout_s (its server died) ends in nats' TimeoutError, as a request would.

    That watch is a consumer the cluster places on any of the bucket's servers, whose copy can lag
    the latest writes: the stream's leader says the bucket's last revision first, and its own copy
    gives what the watch ended short of. The leader keeps one message a key, so that is at most a
    read a key; none where the watch saw the last revision, or where what came after it expired."""
    js = client.js
    last = (await js.stream_info(f"KV_{bucket}")).state.last_seq
    watcher = await (await js.key_value(bucket)).watchall(inactive_threshold=WATCH_INACTIVE_S)
    out: dict[str, tuple[int, bytes]] = {}
    seen = 0  # the watch's latest revision, of a key live or ended
    try:
        while True:
            entry = await watcher.updates(client.config.nats.request_timeout_s)
            if entry is None:
                break
            seen = max(seen, entry.revision or 0)
            if entry.operation in (KV_DEL, KV_PURGE):
                out.pop(entry.key, None)
            else:
                out[entry.key] = (entry.revision or 0, entry.value or b"")
            if entry.delta == 0:
                break
    finally:
        await watcher.stop()
    if seen < last:
        filled = 0
        async for key, revision, value in kv_after(client, bucket, seen, direct=False, through=last):
            filled += 1
            if value is None:
                out.pop(key, None)
            else:
                out[key] = (revision, value)
        if filled:
            log.debug("%s: the watch ended at revision %d of %d; %d filled in from the leader",
                      bucket, seen, last, filled)
    return out


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, every: float = 0.1) -> T:
    """predicate()'s first true value, asked every `every` s; a question the cluster could not
    answer (a server died, a stream elects its leader) counts as not yet. TimeoutError after
    timeout_s, naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value: T | None = predicate()
        except FleetUnavailable:
            value = None
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout_s:g} s")


async def retrying(call: Callable[[], Awaitable[T]], timeout_s: float, what: str) -> T:
    """await call(), again after each UNAVAILABLE error (backing off to 1 s), for up to timeout_s.

    For writes that are safe to repeat (a message id, an ack): a server's death or a leader
    election makes them fail for seconds, not for good."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.05
    while True:
        try:
            return await call()
        except UNAVAILABLE as exc:
            if loop.time() + delay > deadline:
                raise FleetUnavailable(
                    f"{what}: no answer within {timeout_s:g} s ({type(exc).__name__}: {exc})") from exc
        await asyncio.sleep(delay)
        delay = min(2 * delay, 1.0)


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _translated(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    except UNAVAILABLE as exc:
        raise FleetUnavailable(f"NATS did not answer: {type(exc).__name__}: {exc}") from exc
    except nats.js.errors.APIError as exc:
        raise FleetError(f"JetStream refused: {exc.description or exc} (code {exc.err_code})") from exc
    except nats.errors.Error as exc:
        raise FleetError(f"NATS: {type(exc).__name__}: {exc}") from exc


def _readable(path: Any, what: str) -> Any:
    try:
        with open(path, "rb"):
            return path
    except OSError as exc:
        raise FleetError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None


def _tls_context(config: FleetConfig) -> ssl.SSLContext | None:
    tls = config.nats.tls
    wants = tls.enabled or any(url.startswith(("tls://", "wss://")) for url in config.nats.urls)
    if not wants:
        return None
    try:
        context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca is not None else None)
        if tls.cert is not None and tls.key is not None:
            context.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise FleetError(f"nats.tls: cannot load {tls.ca or ''} {tls.cert or ''} {tls.key or ''}: {exc}") from None
    return context
