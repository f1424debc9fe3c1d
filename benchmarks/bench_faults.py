"""How long an S3 request waits on an endpoint that stops answering, with the default timeouts.

    python benchmarks/bench_faults.py                   # the defaults (about 5 minutes)
    python benchmarks/bench_faults.py --read-s 5 --attempts 3

A moto S3 server runs in its own process on loopback. For each case the server is frozen
(SIGSTOP: connections stay open, nothing answers), or its port closed, and one read or one write
of cellmi's storage helpers is timed until it gives up with an infrastructure error (exit status
75 at the command line); the same request on the working server is timed for comparison. The
documented bound (docs/failures.md): a silent endpoint is given up on within about two minutes.
Writes benchmarks/out/faults.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reliability.servers

from cellmi.errors import InfrastructureError
from cellmi.settings import TimeoutSettings
from cellmi.store import S3Limits, read_bytes, set_s3_limits, write_bytes_atomic
from tests.reliability.servers import AWS, MotoServer, free_port

OUT = Path(__file__).resolve().parent / "out"
BUCKET = "bench-faults"
SIZE = 4 << 20  # bytes of the object read and written


def timed(action) -> tuple[float, str]:
    """(seconds, how it ended: "ok" or the error's first line)."""
    start = time.monotonic()
    try:
        action()
        ended = "ok"
    except InfrastructureError as err:
        ended = str(err).split(" (", 1)[0]
    return round(time.monotonic() - start, 1), ended


def cases(server: MotoServer) -> list[dict]:
    url = f"s3://{BUCKET}/object"
    read = lambda: read_bytes(url)  # noqa: E731
    write = lambda: write_bytes_atomic(url, os.urandom(SIZE))  # noqa: E731
    rows = []
    for name, action in (("read", read), ("write", write)):
        seconds, ended = timed(action)
        rows.append({"endpoint": "answering", "request": name, "seconds": seconds, "ended": ended})
        server.freeze()
        try:
            seconds, ended = timed(action)
        finally:
            server.thaw()
        rows.append({"endpoint": "frozen", "request": name, "seconds": seconds, "ended": ended})
        print(rows[-1], flush=True)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    seconds, ended = timed(read)
    rows.append({"endpoint": "refusing", "request": "read", "seconds": seconds, "ended": ended})
    return rows


def table(report: dict) -> str:
    limits = report["limits"]
    lines = [
        f"S3 limits: {limits['attempts']} tries, connect {limits['connect_s']:g} s, read {limits['read_s']:g} s; "
        f"{report['object_mib']} MiB object",
        "",
        "| endpoint | request | seconds | ended |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {r['endpoint']} | {r['request']} | {r['seconds']:.1f} | {r['ended']} |" for r in report["rows"]]
    return "\n".join(lines)


def main() -> None:
    defaults = TimeoutSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect-s", type=float, default=defaults.s3_connect_s)
    parser.add_argument("--read-s", type=float, default=defaults.s3_read_s)
    parser.add_argument("--attempts", type=int, default=defaults.s3_attempts)
    parser.add_argument("--out", default=str(OUT / "faults.json"))
    args = parser.parse_args()
    limits = S3Limits(connect_s=args.connect_s, read_s=args.read_s, attempts=args.attempts)
    set_s3_limits(limits)
    server = MotoServer()
    try:
        os.environ.update({**AWS, "AWS_ENDPOINT_URL": server.url})
        boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket=BUCKET)
        write_bytes_atomic(f"s3://{BUCKET}/object", os.urandom(SIZE))
        rows = cases(server)
    finally:
        server.stop()
    report = {
        "limits": vars(limits),
        "object_mib": SIZE >> 20,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
