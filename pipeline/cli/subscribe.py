"""`maskstream subscribe ENDPOINT`: print (or save as JSONL) what a pipeline publishes.

Part of the CLI, so it may print and choose exit statuses: one JSON line per message on
stdout (format: docs/schema.md), a summary of received/missed frames per stream on stderr.
Ctrl-C ends it normally (exit 0) with the files closed and the summary printed. A publisher
with CurveZMQ keys needs --server-key and --client-key (README: Publishing beyond this host).

A nats:// (or tls://) endpoint reads fleet mode's results stream instead (docs/fleet.md):
--stream takes shell patterns there (`cam*`), --from-seq replays from a stream sequence number,
and the summary says where to resume. As the fleet commands do, it takes the servers as `--nats
URL` too, or from --fleet-config's nats.urls when no endpoint is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the handler imports these itself: see cli/main.py
    from maskstream.pipeline.client import Subscriber
    from maskstream.pipeline.media.outputs import JsonlWriter


EXAMPLES = """
  maskstream subscribe tcp://127.0.0.1:5556                       # every stream, JSON lines on stdout
  maskstream subscribe tcp://127.0.0.1:5556 --stream cam0 --out cam0.jsonl
  maskstream subscribe nats://127.0.0.1:4222 --stream 'cam*' --from-seq 1   # a fleet's results, replayed
  maskstream subscribe --fleet-config fleet.yaml --stream door                # its servers from the config
"""


def add_parsers(subparsers: Any) -> None:
    """Add `subscribe` to the CLI's subparsers (argparse's _SubParsersAction)."""
    from maskstream.pipeline.cli.options import add_logging, config_file, subcommand

    parser = subcommand(subparsers, "subscribe", "print or save the detections a running pipeline publishes "
                        "(JSON lines)", EXAMPLES)
    parser.add_argument("endpoint", nargs="?",
                        help="the pipeline's publish address, e.g. tcp://127.0.0.1:5556, or a fleet's NATS server, "
                             "e.g. nats://127.0.0.1:4222 (for a fleet: or --nats, or --fleet-config's nats.urls)")
    parser.add_argument("--nats", action="append", default=[], metavar="URL",
                        help="NATS: a server of the fleet, as the fleet commands take it (repeatable; instead of "
                             "ENDPOINT)")
    parser.add_argument(
        "--stream", action="append", dest="streams", metavar="ID",
        help="receive only this stream (repeatable; default: all); on NATS also a pattern such as 'cam*'. "
             "With exact streams given, exits after their ends",
    )
    parser.add_argument("--from-seq", type=_positive_int, metavar="N",
                        help="NATS: replay from the results stream's sequence number N (1: all it keeps; "
                             "default: only new results)")
    parser.add_argument("--fleet-config", type=config_file, metavar="PATH",
                        help="NATS: fleet YAML with the servers, credentials and TLS to connect with")
    parser.add_argument("--fleet-set", action="append", default=[], metavar="KEY=VALUE",
                        help="NATS: override a fleet config value, as the fleet commands take it")
    parser.add_argument("--out", type=Path, help="write the JSON lines to this file instead of stdout")
    parser.add_argument("--count", type=_positive_int, metavar="N", help="exit after N messages")
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="exit with status 1 after this long without a message"
    )
    parser.add_argument("--server-key", type=Path, metavar="FILE",
                        help="CurveZMQ: the publisher's public key file (NAME.key), for a pipeline run with "
                             "--publish-key; with --client-key")
    parser.add_argument("--client-key", type=Path, metavar="FILE",
                        help="CurveZMQ: this subscriber's secret key file (NAME.key_secret), whose public key is "
                             "among the publisher's --publish-clients")
    parser.add_argument("--max-message-bytes", type=_positive_int, metavar="N",
                        help="ZeroMQ: refuse a message part larger than N bytes (ZMQ_MAXMSGSIZE; the publisher's "
                             "connection is dropped and made again, the frames missed meanwhile are counted as "
                             "missed; default: 64 MiB)")
    add_logging(parser)
    parser.set_defaults(func=subscribe)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def subscribe(args: argparse.Namespace) -> int:
    from maskstream.pipeline.client import is_nats_url
    from maskstream.pipeline.media.outputs import JsonlWriter, OutputError

    fleet = _fleet_config(args)  # read once: it may stand for the endpoint, and it connects to NATS
    args.endpoint = _endpoint(args, fleet)
    fleet_errors: tuple[type[Exception], ...] = ()
    if is_nats_url(args.endpoint):  # the NATS client is imported for NATS endpoints only
        from maskstream.pipeline.fleet.connection import FleetError

        fleet_errors = (FleetError,)
    status = 0
    try:
        sub = _open(args, fleet)
    except fleet_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with sub:
        try:
            writer = JsonlWriter(args.out) if args.out else None
        except OutputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            status = _receive(sub, writer, args.count)
        except KeyboardInterrupt:
            pass  # the usual way to stop a subscriber: not an error
        except OutputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
        except fleet_errors as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
        except BrokenPipeError:
            # stdout's reader went away (e.g. `| head`); point stdout at devnull so the
            # interpreter's final flush does not complain about it again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        finally:
            if writer is not None:
                writer.close()
        for sid, stats in sorted(sub.stats.items()):
            ended = "ended" + (f" with error: {stats.error}" if stats.error else "") if stats.ended else "open"
            print(
                f"{sid}: {stats.received} messages, {stats.missed} frames missed in {stats.gaps} gaps, {ended}",
                file=sys.stderr,
            )
        if is_nats_url(args.endpoint):
            print(f"resume with --from-seq {sub.last_stream_seq + 1}", file=sys.stderr)
    return status


def _endpoint(args: argparse.Namespace, fleet: Any) -> str:
    """ENDPOINT, or the fleet's servers from --nats or the fleet config (comma-separated, as the
    NATS subscriber reads them); ValueError (exit 2) for none or both."""
    from maskstream.pipeline.client import is_nats_url

    if args.nats:
        from maskstream.pipeline.fleet.config import server_urls_option

        if args.endpoint is not None:
            raise ValueError(f"give the endpoint ({args.endpoint}) or --nats, not both")
        urls = server_urls_option(args.nats)
        for url in urls:
            if not is_nats_url(url):
                raise ValueError(f"--nats {url!r}: subscribe reaches NATS by nats:// or tls://")
        return ",".join(urls)
    if args.endpoint is not None:
        return str(args.endpoint)
    if fleet is not None:
        return ",".join(fleet.nats.urls)
    raise ValueError("no endpoint: give the pipeline's publish address (e.g. tcp://127.0.0.1:5556), or a fleet's "
                     "NATS server (nats://... or --nats URL, or --fleet-config with its nats.urls)")


def _fleet_config(args: argparse.Namespace) -> Any:
    """The FleetConfig of --fleet-config and --fleet-set (the bundled one's defaults under the
    sets), or None where neither is given."""
    if args.fleet_config is None and not args.fleet_set:
        return None
    from maskstream.configs import CONFIG_DIR
    from maskstream.pipeline.config import load_config
    from maskstream.pipeline.fleet.config import FleetConfig

    return load_config(FleetConfig, args.fleet_config or CONFIG_DIR / "fleet.yaml", args.fleet_set)


def _open(args: argparse.Namespace, fleet: Any) -> Subscriber:
    from maskstream.pipeline.client import Subscriber, is_nats_url

    if not is_nats_url(args.endpoint) and (args.from_seq is not None or fleet is not None):
        raise ValueError("--from-seq, --fleet-config and --fleet-set are for NATS endpoints (nats://...)")
    if is_nats_url(args.endpoint) and args.max_message_bytes is not None:
        raise ValueError("--max-message-bytes is for ZeroMQ endpoints (on NATS the server bounds messages)")
    limit = {} if args.max_message_bytes is None else {"max_message_bytes": args.max_message_bytes}
    return Subscriber(args.endpoint, streams=args.streams, timeout_s=args.timeout, server_key=args.server_key,
                      client_key=args.client_key, from_seq=args.from_seq, fleet_config=fleet, **limit)


def _receive(sub: Subscriber, writer: JsonlWriter | None, count: int | None) -> int:
    from maskstream.pipeline.client import SchemaVersionError
    from maskstream.pipeline.results import to_json
    from maskstream.pipeline.runtime.messages import MessageError

    received = 0
    while count is None or received < count:
        try:
            message = next(sub)
        except StopIteration:  # every requested stream has ended
            return 0
        except SchemaVersionError:
            raise  # nothing from this publisher can be read: the CLI reports it and exits
        except MessageError as exc:
            print(f"warning: skipped a message: {exc}", file=sys.stderr)
            continue
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        received += 1
        if writer is not None:
            writer.write(message)
        else:
            print(json.dumps(to_json(message, gap=sub.last_gap), separators=(",", ":")), flush=True)
    return 0
