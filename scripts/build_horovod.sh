#!/usr/bin/env bash
# Builds Horovod 0.28.1 against the venv's torch 2.13 and installs it into .venv (about 2.5 minutes; the wheel is
# cached in build/wheels/ so later setups take seconds).
#
# Why not `pip install horovod`: its build isolation hides torch, and its CMake files pin C++14 while torch 2.x headers
# need C++17. We fetch the sdist, raise the standard to 17 and build without isolation, with MPI and Gloo controllers.
#
# The images (docker/Dockerfile*) run it too, with PY and WHEELS set: PY is the interpreter whose torch Horovod is
# built against and installed into, WHEELS the folder of cached wheels. HOROVOD_GPU_OPERATIONS=NCCL and the CUDA/NCCL
# homes, when exported by the caller, reach Horovod's build as they are (docker/Dockerfile).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.28.1
PY=${PY:-.venv/bin/python}
WHEELS=${WHEELS:-build/wheels}
if "$PY" -c "import horovod.torch" 2>/dev/null; then
    exit 0
fi
mkdir -p "$WHEELS"
wheel=$(ls "$WHEELS"/horovod-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    echo "setup: building horovod $VERSION against torch (about 2.5 minutes, once)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
    tar -xzf "$work"/horovod-"$VERSION".tar.gz -C "$work"
    src="$work/horovod-$VERSION"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_MPI=1 \
        HOROVOD_WITH_GLOO=1 MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps "$src" -w "$WHEELS"
    wheel=$(ls "$WHEELS"/horovod-"$VERSION"-*.whl | head -n1)
fi
# Horovod's own requirements (cloudpickle, psutil, pyyaml, packaging) are pinned in requirements-dev.txt.
"$PY" -m pip install -q --disable-pip-version-check --no-deps "$wheel"
"$PY" -c "import horovod.torch"
