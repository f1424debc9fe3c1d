#!/usr/bin/env bash
# Build the cellmi image with podman and run it the way a cluster does: as a non-root user, with a
# read-only root filesystem, all capabilities dropped, no network and one writable work volume.
#
#   bash docker/test-image.sh                 # build, --help, config, launcher, then `cellmi run --quick`
#   QUICK_RUN=0 bash docker/test-image.sh     # everything but the end-to-end run
#
# Exit 0 with "test-image: PASSED" or "test-image: SKIPPED: <why>" (podman cannot be set up here);
# any failed check exits non-zero. Torch comes from a local wheel when one is on disk (TORCH_WHEEL_DIR,
# else /opt/wheels), otherwise from the PyTorch CPU index, as the Dockerfile does by default.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TAG:-localhost/cellmi:test}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
QUICK_RUN=${QUICK_RUN:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
SETUP=${SETUP:-../shared/tools/local-base-image.sh}

say() { echo "test-image: $*"; }
skip() { say "SKIPPED: $*"; exit 0; }
fail() { say "FAILED: $*" >&2; exit 1; }

ensure_podman() {
  if command -v podman >/dev/null && podman image exists "docker.io/library/$BASE_IMAGE"; then
    return
  fi
  if [ -f "$SETUP" ]; then
    say "setting up podman and the base image with $SETUP"
    bash "$SETUP" >/tmp/cellmi-podman-setup.log 2>&1 \
      || skip "podman could not be set up (log: /tmp/cellmi-podman-setup.log)"
  fi
  command -v podman >/dev/null || skip "podman is not installed and $SETUP is not here"
  podman info >/dev/null 2>&1 || skip "podman is installed but cannot run containers here"
}

torch_wheel_dir() {
  local dir
  for dir in ${TORCH_WHEEL_DIR:-} /opt/wheels; do
    if compgen -G "$dir/torch-${TORCH_VERSION}*-cp311-*.whl" >/dev/null; then
      echo "$dir"
      return
    fi
  done
}

build() {
  local args=(--format docker -f docker/Dockerfile -t "$TAG" --build-arg "BASE_IMAGE=$BASE_IMAGE"
              --build-arg "TORCH_VERSION=$TORCH_VERSION" --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
              --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
              --build-arg "VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' cellmi/__init__.py)")
  local wheels
  wheels=$(torch_wheel_dir)
  if [ -n "$wheels" ]; then
    say "torch from the local wheel in $wheels"
    args+=(-v "$wheels:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels)
  fi
  local start=$SECONDS
  podman build "${args[@]}" . >/tmp/cellmi-image-build.log 2>&1 \
    || { tail -n 40 /tmp/cellmi-image-build.log >&2; fail "image build (log: /tmp/cellmi-image-build.log)"; }
  say "built $TAG in $((SECONDS - start)) s, $(podman image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
}

check_config() {
  podman image inspect --format '{{json .Config}}' "$TAG" | python3 -c '
import json, sys
config = json.load(sys.stdin)
user = config.get("User", "")
assert user and user.split(":")[0] not in ("0", "root"), f"image runs as root: {user!r}"
baked = [e for e in config.get("Env", []) if e.startswith("CELLMI_")]
assert not baked, f"CELLMI_* defaults baked into the image: {baked}"
assert config.get("Entrypoint") == ["cellmi"], config.get("Entrypoint")
labels = config.get("Labels") or {}
for key in ("title", "version", "revision", "licenses"):
    assert labels.get(f"org.opencontainers.image.{key}"), f"missing OCI label {key}"
print("test-image: image config: user", user, "| entrypoint cellmi | no CELLMI_* | OCI labels")
'
}

# The way Kubernetes runs it (see k8s/base): read-only root, tmpfs /tmp, no capabilities, not root.
contained() {
  timeout "$RUN_TIMEOUT" podman run --rm --read-only --tmpfs /tmp:rw,size=2g --cap-drop=ALL \
    --security-opt=no-new-privileges --network=none --shm-size=1g -v "$WORK:/work" "$@"
}

ensure_podman
WORK=$(mktemp -d /tmp/cellmi-image-work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
chmod 0777 "$WORK"  # the image's user (uid 10001) writes here
build
check_config

# Output captured before it is searched: `grep -q` stops reading at the first match, and podman,
# writing on into the closed pipe, then fails the pipeline (pipefail) now and then.
help=$(contained "$TAG" --help) || fail "cellmi --help"
grep -q "usage: cellmi" <<<"$help" || fail "cellmi --help"
say "cellmi --help ok"

contained -e CELLMI_TRAIN__STEPS=7 "$TAG" config | python3 -c '
import json, sys
settings = json.load(sys.stdin)
assert settings["train"]["steps"] == 7, settings["train"]
assert settings["workdir"] == "./cellmi-work", settings["workdir"]
' || fail "cellmi config"
say "cellmi config ok (CELLMI_* from the environment reach the settings)"

uid=$(contained --entrypoint id "$TAG" -u)
[ "$uid" != 0 ] || fail "container runs as root"
plan=$(contained -e SLURM_JOB_ID=1 -e SLURM_NNODES=2 -e SLURM_NODEID=1 -e MASTER_ADDR=10.0.0.1 \
  "$TAG" launch --dry-run --nproc-per-node 1 train) || fail "cellmi launch"
grep -q '"node_rank": 1' <<<"$plan" || fail "cellmi launch"
contained --entrypoint dask "$TAG" scheduler --help >/dev/null || fail "dask scheduler (DaskJob, k8s/dask-plain)"
contained --entrypoint dask "$TAG" worker --help >/dev/null || fail "dask worker"
contained --entrypoint cellmi-launch "$TAG" info >/dev/null || fail "cellmi-launch"
say "uid $uid, launcher and dask commands ok"

if [ "$QUICK_RUN" = 1 ]; then
  start=$SECONDS
  contained -e CELLMI_WORKDIR=/work/quick "$TAG" run --quick >"$WORK/quick.log" 2>&1 \
    || { tail -n 40 "$WORK/quick.log" >&2; fail "cellmi run --quick"; }
  [ -s "$WORK/quick/analysis/report.html" ] || fail "no report at quick/analysis/report.html"
  say "cellmi run --quick ok in $((SECONDS - start)) s: $(tail -n 3 "$WORK/quick.log" | tr '\n' ' ')"
fi
say PASSED
