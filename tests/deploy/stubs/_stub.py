"""Shared code of the SLURM/Apptainer stand-ins: record every call, keep job state in STUB_DIR.

Each stub appends {"cmd": name, "args": [...], "env": {...}} to STUB_DIR/calls.jsonl and then does
locally what the real command would have the cluster do. Only for tests.
"""

from __future__ import annotations

import fcntl
import json
import os
import re

STATE = os.environ.get("STUB_DIR", "/tmp/cellmi-stubs")
KEEP_ENV = ("SLURM_", "MASTER_", "CELLMI_", "DASK_SCHEDULER_ADDRESS")


def record(cmd: str, args: list[str]) -> None:
    os.makedirs(STATE, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.startswith(KEEP_ENV)}
    with open(os.path.join(STATE, "calls.jsonl"), "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(json.dumps({"cmd": cmd, "args": args, "env": env, "cwd": os.getcwd()}) + "\n")


def next_job_id() -> int:
    os.makedirs(STATE, exist_ok=True)
    with open(os.path.join(STATE, "counter"), "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        value = int(handle.read() or "1000") + 1
        handle.seek(0)
        handle.truncate()
        handle.write(str(value))
    return value


def expand(nodelist: str) -> list[str]:
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            hosts += [f"{prefix}{n:0{len(first)}d}" for n in range(int(first), int(last or first) + 1)]
    return hosts


def split_options(args: list[str], with_value: set[str]) -> tuple[dict[str, str], list[str]]:
    """Leading options (``--x=v``, ``--x v``, ``-x v``, flags) and the rest from the first operand on."""
    options: dict[str, str] = {}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        name, eq, value = args[i].partition("=")
        if not eq and name in with_value:
            i += 1
            value = args[i]
        options[name] = value if (eq or name in with_value) else "1"
        i += 1
    return options, args[i:]
