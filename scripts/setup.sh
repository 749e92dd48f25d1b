#!/usr/bin/env bash
# Sets up the project on a Debian 12 machine: system packages (as root, through apt), then .venv with exact pins.
# Idempotent: each part is skipped when already done. Called by `make setup` (and so by `make demo`/`make test`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Open MPI and a compiler toolchain: mpirun for the distributed tests, and the Horovod build (scripts/build_horovod.sh).
# Slurm, munge and Slurm's PBS wrappers (qsub): the tests start a single-node cluster (tests/slurm_cluster.py).
# Chromium: the test of hpo_worker's HTML report loads the page in it, headless (tests/test_hpo_status.py).
# podman, runc and debootstrap: the images are built from a debootstrap base and run (scripts/build_images.sh).
APT_PACKAGES=(
    python3 python3-venv python3-pip python3-dev dataset-fashion-mnist
    openmpi-bin libopenmpi-dev cmake g++ make
    slurm-wlm munge slurm-wlm-torque
    chromium
    podman runc debootstrap
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "setup: missing system packages: ${missing[*]}" >&2
        echo "setup: install them as root (apt-get install ${missing[*]}) or run 'make setup' as root." >&2
        exit 1
    fi
    echo "setup: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
echo "setup: installing pinned Python packages into .venv"
# torch first and alone, pinned: nothing afterwards may ask pip to choose another build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
# Horovod is an optional extra for users; the project's own environment builds it so that its tests run.
bash scripts/build_horovod.sh
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.split("+")[0] == "2.13.0", f"expected torch 2.13.0, found {torch.__version__}"
PY
echo "setup: done"
