#!/usr/bin/env bash
# Submit the pipeline as four SLURM jobs, each starting only when the one before succeeded:
# ingest -> train (multi-node) -> infer (Dask workers as jobs) -> cluster. A failed stage cancels
# the rest (--kill-on-invalid-dep). Extra arguments go to sbatch for every job (e.g. --account=x).
#
#   SIF=/shared/cellmi.sif ENV_FILE=jobs/env/s3.env bash jobs/slurm/pipeline.sh --partition=gpu
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

submit() {
  local out
  out=$(sbatch --parsable --kill-on-invalid-dep=yes "$@")
  echo "${out%%;*}"  # --parsable prints "id" or "id;cluster"
}

ingest=$(submit "$@" "$here/stage.sbatch" ingest)
train=$(submit "$@" --dependency="afterok:$ingest" "$here/train.sbatch")
infer=$(submit "$@" --dependency="afterok:$train" "$here/infer.sbatch")
cluster=$(submit "$@" --dependency="afterok:$infer" "$here/stage.sbatch" cluster)
echo "submitted ingest $ingest -> train $train -> infer $infer -> cluster $cluster"
