"""Start ``cellmi train`` under torchrun on whatever scheduler runs this node.

    cellmi launch train --train.steps 500       # in the image (its entrypoint is cellmi)
    cellmi-launch --nproc-per-node 4 train      # the same as a console script
    cellmi-launch info                          # print what was detected, as JSON
    cellmi-launch dask-slurm --jobs 4 -- cellmi infer   # Dask workers as SLURM jobs around a command

Run one launcher per node. It finds the node count, this node's rank and the rendezvous
address in the scheduler's own variables (first match wins) and starts torchrun's static
rendezvous with them:

    Kubeflow PyTorchJob       PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR (torchrun's own names)
    Kubernetes Indexed Job    JOB_COMPLETION_INDEX; PET_NNODES and PET_MASTER_ADDR from the manifest
    SLURM                     SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID; MASTER_ADDR, else the first
                              host of SLURM_JOB_NODELIST (``scontrol show hostnames``)
    AWS Batch multi-node      AWS_BATCH_JOB_NUM_NODES, AWS_BATCH_JOB_NODE_INDEX,
                              AWS_BATCH_JOB_MAIN_NODE_INDEX, AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS
    Google Cloud Batch        BATCH_TASK_COUNT, BATCH_TASK_INDEX, BATCH_HOSTS_FILE
    nothing                   one node (torchrun --standalone)

The port is MASTER_PORT or PET_MASTER_PORT, default 29500. Settings are checked before
torchrun starts, and a worker's user error (exit 2) or infrastructure fault (exit 75) is the
launcher's exit status, so a Kubernetes podFailurePolicy can fail the Job at once or retry it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from cellmi.errors import INFRA_EXIT, UserError
from cellmi.log import log, setup_logging

DEFAULT_PORT = 29500
LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class Topology:
    """Where this node sits in a multi-node run."""

    scheduler: str
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


# ---------------------------------------------------------------- detection (pure)
def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    if not value.strip().isdigit():
        raise UserError(f"{name}={value!r}: expected a non-negative integer")
    return int(value)


def _port(env: Mapping[str, str]) -> int:
    for name in ("MASTER_PORT", "PET_MASTER_PORT"):
        if env.get(name):
            port = _int(env, name)
            if not 0 < port < 65536:
                raise UserError(f"{name}={port}: not a TCP port")
            return port
    return DEFAULT_PORT


def _required(env: Mapping[str, str], name: str, why: str) -> str:
    if not env.get(name):
        raise UserError(f"{name} is not set; {why}")
    return env[name]


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compact host list as host names: ``n[01-02,05],gpu1`` -> n01, n02, n05, gpu1."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", text):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{len(first)}d}")
    return hosts


def _slurm_master(env: Mapping[str, str]) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_STEP_NODELIST") or _required(env, "SLURM_JOB_NODELIST", "run under srun")
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    return expand_hostlist(nodelist)[0]


def _slurm(env: Mapping[str, str]) -> Topology:
    nnodes = _int(env, "SLURM_STEP_NUM_NODES" if "SLURM_STEP_NUM_NODES" in env else "SLURM_NNODES")
    tasks = env.get("SLURM_STEP_NUM_TASKS")
    if tasks and tasks.isdigit() and int(tasks) > nnodes:
        raise UserError(
            f"SLURM step has {tasks} tasks on {nnodes} nodes; run one launcher per node "
            "(srun --ntasks-per-node=1)"
        )
    return Topology("slurm", nnodes, _int(env, "SLURM_NODEID"), _slurm_master(env), _port(env))


def _aws_batch(env: Mapping[str, str]) -> Topology:
    nnodes = _int(env, "AWS_BATCH_JOB_NUM_NODES")
    index = _int(env, "AWS_BATCH_JOB_NODE_INDEX")
    main = _int(env, "AWS_BATCH_JOB_MAIN_NODE_INDEX") if env.get("AWS_BATCH_JOB_MAIN_NODE_INDEX") else 0
    # Batch does not give the main node its own address; it hosts the store, so loopback reaches it.
    master = (
        LOCALHOST
        if index == main
        else _required(
            env, "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS", "is this a multi-node parallel job?"
        )
    )
    return Topology("aws-batch", nnodes, (index - main) % nnodes, master, _port(env))


def _gcp_batch(env: Mapping[str, str]) -> Topology:
    nnodes = _int(env, "BATCH_TASK_COUNT")
    master = LOCALHOST
    if nnodes > 1:
        path = _required(env, "BATCH_HOSTS_FILE", "set requireHostsFile: true in the task group")
        try:
            with open(path, encoding="utf-8") as handle:
                hosts = handle.read().split()
        except OSError as err:
            raise UserError(f"BATCH_HOSTS_FILE {path}: {err.strerror}") from None
        if len(hosts) < nnodes:
            raise UserError(f"BATCH_HOSTS_FILE {path}: {len(hosts)} hosts for {nnodes} tasks")
        master = hosts[0]
    return Topology("gcp-batch", nnodes, _int(env, "BATCH_TASK_INDEX"), master, _port(env))


def _kubernetes(env: Mapping[str, str]) -> Topology:
    why = "the Indexed Job's manifest must set it (see k8s/base/train-job.yaml)"
    _required(env, "PET_NNODES", why)
    master = _required(env, "PET_MASTER_ADDR", why)
    return Topology(
        "kubernetes", _int(env, "PET_NNODES"), _int(env, "JOB_COMPLETION_INDEX"), master, _port(env)
    )


def _kubeflow(env: Mapping[str, str]) -> Topology:
    master = _required(env, "PET_MASTER_ADDR", "Kubeflow sets it beside PET_NODE_RANK")
    return Topology("kubeflow", _int(env, "PET_NNODES"), _int(env, "PET_NODE_RANK"), master, _port(env))


def _single(env: Mapping[str, str]) -> Topology:
    return Topology("none", 1, 0, LOCALHOST, _port(env))


DETECTORS = (
    ("PET_NODE_RANK", _kubeflow),
    ("JOB_COMPLETION_INDEX", _kubernetes),
    ("SLURM_JOB_ID", _slurm),
    ("AWS_BATCH_JOB_NUM_NODES", _aws_batch),
    ("BATCH_TASK_INDEX", _gcp_batch),
)


def detect(env: Mapping[str, str] | None = None) -> Topology:
    """This node's topology from the scheduler's environment variables (see the module docstring)."""
    env = os.environ if env is None else env
    make = next((make for name, make in DETECTORS if env.get(name)), _single)
    topology = make(env)
    if topology.nnodes < 1 or not 0 <= topology.node_rank < topology.nnodes:
        raise UserError(
            f"{topology.scheduler}: node rank {topology.node_rank} is outside 0..{topology.nnodes - 1}"
        )
    return topology


# ---------------------------------------------------------------- torchrun
def default_nproc(env: Mapping[str, str]) -> int:
    """Processes per node: PET_NPROC_PER_NODE, else one per visible GPU, else one."""
    if env.get("PET_NPROC_PER_NODE", "").isdigit():
        return int(env["PET_NPROC_PER_NODE"])
    import torch

    return max(1, torch.cuda.device_count())


def torchrun_args(topology: Topology, nproc: int, module: str, job_args: Sequence[str]) -> list[str]:
    """torchrun's arguments for this node; one node runs standalone (it picks a free port itself)."""
    if topology.nnodes == 1:
        where = ["--standalone", "--nnodes=1"]
    else:
        where = [
            f"--nnodes={topology.nnodes}",
            f"--node-rank={topology.node_rank}",
            f"--master-addr={topology.master_addr}",
            f"--master-port={topology.master_port}",
        ]
    return [*where, f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", module, *job_args]


def check_settings(job_args: Sequence[str]) -> None:
    """Validate the train settings here, so a typo fails every node at once with exit status 2."""
    from pydantic import ValidationError

    from cellmi.cli import describe_validation, load_settings

    try:
        load_settings(list(job_args[1:]), prog="cellmi train")
    except ValidationError as err:
        raise UserError(describe_validation(err)) from None


def run_torchrun(args: list[str]) -> int:
    """torchrun in this process; a worker's exit status 2 (user error) or else 75 (infrastructure,
    safe to retry) becomes ours, so the scheduler can fail fast or retry."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        log.error("training failed on this node (worker exit status %s)", ", ".join(map(str, codes)))
        for code in (UserError.exit_code, INFRA_EXIT):
            if code in codes:
                return code
        return 1
    return 0


# ---------------------------------------------------------------- Dask on SLURM
def dask_slurm(options: argparse.Namespace, command: Sequence[str]) -> int:
    """Start Dask workers as SLURM jobs, run ``command`` with DASK_SCHEDULER_ADDRESS, stop the workers."""
    try:
        from dask_jobqueue import SLURMCluster
        from distributed import Client
    except ImportError:
        raise UserError("dask-slurm needs dask-jobqueue: pip install dask-jobqueue") from None
    cluster_options = dict(
        cores=options.cores,
        processes=options.processes,
        memory=options.memory,
        walltime=options.walltime,
        queue=options.queue,
        account=options.account,
        python=options.python,
        interface=options.interface,
        job_extra_directives=options.directive,
        job_script_prologue=options.prologue,
        log_directory=options.log_directory,
        scheduler_options={"host": options.host} if options.host else {},
        worker_extra_args=["--resources", options.resources] if options.resources else [],
    )
    with SLURMCluster(**cluster_options) as cluster:
        cluster.scale(jobs=options.jobs)
        log.info("Dask scheduler %s, %d worker job(s) submitted", cluster.scheduler_address, options.jobs)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=options.wait_timeout)
        env = {**os.environ, "DASK_SCHEDULER_ADDRESS": cluster.scheduler_address}
        return subprocess.run(list(command), env=env, check=False).returncode


# ---------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellmi-launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc-per-node", type=int, help="Processes per node (default: GPUs, else 1).")
    parser.add_argument("--module", default="cellmi", help="Module torchrun runs (default: cellmi).")
    parser.add_argument(
        "--dry-run", action="store_true", help="Print the torchrun arguments as JSON and exit."
    )
    parser.add_argument("job", choices=("train", "info", "dask-slurm"), help="What to launch.")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="Flags of the job (cellmi train flags).")
    return parser


def _dask_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellmi-launch dask-slurm", usage="%(prog)s [options] -- COMMAND..."
    )
    parser.add_argument("--jobs", type=int, default=2, help="Worker jobs to submit.")
    parser.add_argument("--cores", type=int, default=4, help="Cores per worker job.")
    parser.add_argument("--processes", type=int, default=1, help="Worker processes per job.")
    parser.add_argument("--memory", default="16GB", help="Memory per worker job.")
    parser.add_argument("--walltime", default="02:00:00", help="Time limit of a worker job.")
    parser.add_argument("--queue", help="SLURM partition.")
    parser.add_argument("--account", help="SLURM account.")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Python that runs a worker, e.g. 'apptainer exec cellmi.sif python'.",
    )
    parser.add_argument("--interface", help="Network interface of scheduler and workers, e.g. ib0.")
    parser.add_argument("--host", help="Address the scheduler listens on (default: this host's).")
    parser.add_argument(
        "--directive", action="append", default=[], help="Extra #SBATCH line, e.g. --gres=gpu:1."
    )
    parser.add_argument(
        "--prologue", action="append", default=[], help="Shell line before the worker starts."
    )
    parser.add_argument(
        "--resources", help="Dask resources each worker offers, e.g. GPU=1 (GPU workers get batched inference)."
    )
    parser.add_argument("--log-directory", help="Folder for the worker jobs' SLURM logs.")
    parser.add_argument(
        "--wait-timeout", type=float, default=1800, help="Seconds to wait for the first worker."
    )
    return parser


def _launch_train(options: argparse.Namespace) -> int:
    topology = detect()
    job_args = ["train", *options.args]
    if options.module == "cellmi":
        check_settings(job_args)
    nproc = options.nproc_per_node or default_nproc(os.environ)
    args = torchrun_args(topology, nproc, options.module, job_args)
    if options.dry_run:
        print(json.dumps({"topology": asdict(topology), "torchrun": args}))
        return 0
    log.info(
        "%s: node %d of %d, rendezvous %s:%d, %d process(es)",
        topology.scheduler,
        topology.node_rank,
        topology.nnodes,
        topology.master_addr,
        topology.master_port,
        nproc,
    )
    return run_torchrun(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``cellmi-launch``; also ``cellmi launch`` and ``python -m cellmi.launch``."""
    options = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging("INFO")
    try:
        if options.job == "info":
            print(json.dumps(asdict(detect())))
            return 0
        if options.job == "dask-slurm":
            rest = options.args
            split = rest.index("--") if "--" in rest else len(rest)
            if split == len(rest) - 1 or split == len(rest):
                raise UserError("dask-slurm: give the command to run after --")
            return dask_slurm(_dask_parser().parse_args(rest[:split]), rest[split + 1 :])
        return _launch_train(options)
    except UserError as err:
        print(f"cellmi-launch: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
