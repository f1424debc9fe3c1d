"""``cellmi <job> [--section.field value ...]``: parse settings, run one job.

Jobs: synth, ingest, train, infer, cluster, run, config. Every flag is also an environment
variable (``--train.steps 5`` is ``CELLMI_TRAIN__STEPS=5``); ``cellmi <job> --help`` lists them.
User errors print one line and exit with status 2, storage or cluster services that stop
answering one line and status 75 (safe to retry; see cellmi.errors); credentials inside URLs
are never printed.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from cellmi.errors import RETRY_NOTE, InfrastructureError, UserError, first_line, is_infrastructure, no_answer
from cellmi.log import log, setup_logging
from cellmi.settings import ENV_PREFIX, NESTED, Settings, as_dict, check_env, redact
from cellmi.store import S3Limits, set_s3_limits
from cellmi.watchdog import watch

JOBS: dict[str, tuple[str, str]] = {
    "synth": ("cellmi.data.synth_job", "make the synthetic HT29-like screen (raw DIB folder or store)"),
    "ingest": ("cellmi.data.ingest", "raw images (DIB/TIFF/PNG, local or s3://) to an OME-Zarr store"),
    "train": ("cellmi.train.job", "Deep InfoMax training (single process or under torchrun)"),
    "infer": ("cellmi.infer.job", "sliding-window inference on a Dask cluster"),
    "cluster": ("cellmi.analyze.job", "UMAP + Gaussian mixture, metrics, figures, report"),
    "run": ("cellmi.pipeline", "all of it end to end, reusing finished stages"),
    "config": ("cellmi.cli", "print the effective settings as JSON"),
    "launch": ("cellmi.launch", "train under torchrun on any scheduler (cellmi launch --help)"),
}
USAGE = "usage: cellmi {" + ",".join(JOBS) + "} [--section.field VALUE ...] [--help]"


def load_settings(args: Sequence[str], prog: str = "cellmi") -> Settings:
    """Settings from defaults, ``CELLMI_*`` variables and flags (flags win)."""
    check_env()
    return Settings(_cli_parse_args=list(args), _cli_prog_name=prog, _cli_implicit_flags=True)


def describe_validation(err: ValidationError) -> str:
    """One line naming the variable, the flag and what is wrong with the value."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"] if not isinstance(p, int)]
    env = ENV_PREFIX + NESTED.join(loc).upper() if loc else "settings"
    flag = "--" + ".".join(loc) if loc else ""
    message = first["msg"].removeprefix("Value error, ")
    shown = first.get("input")
    got = "" if isinstance(shown, dict) or shown is None else f" (got {shown!r})"
    return redact(f"{env} ({flag}): {message}{got}")


def run_config(settings: Settings) -> int:
    """``cellmi config``: the effective settings, keys as field names, credentials redacted."""
    print(json.dumps(as_dict(settings), indent=2))
    return 0


def _job_function(job: str) -> Callable[[Settings], int | None]:
    if job == "config":
        return run_config
    return importlib.import_module(JOBS[job][0]).main


def _print_usage() -> None:
    print(USAGE)
    print(__doc__.split("\n\n")[1] if __doc__ else "")
    for name, (_, text) in JOBS.items():
        print(f"  {name:8s} {text}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        _print_usage()
        return 0 if args else 2
    job, rest = args[0], args[1:]
    if job == "launch":  # parses its own flags; AWS Batch cannot replace the image's entrypoint
        from cellmi.launch import main as launch_main

        return launch_main(rest)
    if job not in JOBS:
        print(f"cellmi: error: unknown job {job!r}; choose one of {', '.join(JOBS)}", file=sys.stderr)
        return 2
    try:
        settings = load_settings(rest, prog=f"cellmi {job}")
        setup_logging(settings.log_level)
        return run_job(job, settings)
    except ValidationError as err:
        print(f"cellmi {job}: error: {describe_validation(err)}", file=sys.stderr)
        return 2
    except UserError as err:
        print(redact(f"cellmi {job}: error: {err}"), file=sys.stderr)
        return err.exit_code
    except InfrastructureError as err:
        log.debug("infrastructure fault", exc_info=True)
        print(redact(f"cellmi {job}: error: {err}{RETRY_NOTE}"), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as err:
        message = describe_storage_error(err)
        if message is None:
            raise
        log.debug("storage error", exc_info=True)
        print(redact(f"cellmi {job}: error: {message}"), file=sys.stderr)
        return UserError.exit_code


def run_job(job: str, settings: Settings) -> int:
    """Run one job with the storage limits of ``settings.timeouts`` and a progress watchdog."""
    t = settings.timeouts
    set_s3_limits(S3Limits(connect_s=t.s3_connect_s, read_s=t.s3_read_s, attempts=t.s3_attempts))
    with watch(job, t.stall_s) as dog:
        try:
            return int(_job_function(job)(settings) or 0)
        except Exception as err:
            if is_infrastructure(err) and not isinstance(err, InfrastructureError):  # outside any marked wait
                raise no_answer("a storage or cluster service", dog.quiet(), first_line(err)) from err
            raise


def describe_storage_error(err: Exception) -> str | None:
    """One line for a storage endpoint that refused a request or is misconfigured (not a timeout:
    those are InfrastructureErrors by now); None for anything else (a bug)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - s3fs brings botocore
        BotoCoreError = ClientError = ()  # type: ignore[misc,assignment]
    if isinstance(err, BotoCoreError):
        return f"S3 endpoint misconfigured or credentials missing: {err}"
    if isinstance(err, ClientError):
        return f"S3 refused the request: {err}"
    if isinstance(err, PermissionError):
        return f"access denied ({err}); check the AWS credentials and bucket permissions"
    return None
