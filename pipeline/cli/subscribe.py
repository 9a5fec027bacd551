"""`maskstream subscribe ENDPOINT`: print (or save as JSONL) what a pipeline publishes.

Part of the CLI, so it may print and choose exit statuses: one JSON line per message on
stdout (format: docs/schema.md), a summary of received/missed frames per stream on stderr.
Ctrl-C ends it normally (exit 0) with the files closed and the summary printed. A publisher
with CurveZMQ keys needs --server-key and --client-key (README: Publishing beyond this host).
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
"""


def add_parsers(subparsers: Any) -> None:
    """Add `subscribe` to the CLI's subparsers (argparse's _SubParsersAction)."""
    from maskstream.pipeline.cli.options import add_logging, subcommand

    parser = subcommand(subparsers, "subscribe", "print or save the detections a running pipeline publishes "
                        "(JSON lines)", EXAMPLES)
    parser.add_argument("endpoint", help="the pipeline's publish address, e.g. tcp://127.0.0.1:5556")
    parser.add_argument(
        "--stream", action="append", dest="streams", metavar="ID",
        help="receive only this stream (repeatable; default: all). With streams given, exits after their ends",
    )
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
    add_logging(parser)
    parser.set_defaults(func=subscribe)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def subscribe(args: argparse.Namespace) -> int:
    from maskstream.pipeline.client import Subscriber
    from maskstream.pipeline.media.outputs import JsonlWriter, OutputError

    status = 0
    with Subscriber(args.endpoint, streams=args.streams, timeout_s=args.timeout, server_key=args.server_key,
                    client_key=args.client_key) as sub:
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
    return status


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
