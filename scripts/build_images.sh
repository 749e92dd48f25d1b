#!/usr/bin/env bash
# Builds the project's container images with podman, on a machine with no registry to pull from (docs/containers.md).
#   base      a Debian 12 base made by debootstrap, imported as localhost/debian:bookworm-slim
#   cpu       docker/Dockerfile.cpu                                  -> localhost/distkfac:cpu
#   gpu-base  docker/Dockerfile up to its stage before the CUDA wheels -> localhost/distkfac:gpu-build-base
#   gpu       the whole docker/Dockerfile (downloads several GB of CUDA wheels; no GPU needed to build)
#                                                                    -> localhost/distkfac:gpu
# Usage: scripts/build_images.sh [base|cpu|gpu-base|gpu]...   (default: cpu gpu-base, what `make test-images` tests)
#
# Cached in build/images/ between runs: the base's root file system (debian-bookworm.tar), the torch CPU wheel and the
# Horovod wheels built inside the images (wheels-cpu/, wheels-gpu/). podman keeps its own layer cache as well.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=build/images
BASE=localhost/debian:bookworm-slim
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PY:-.venv/bin/python}
mkdir -p "$CACHE/wheels-cpu" "$CACHE/wheels-gpu"

log() { echo "build_images: $*" >&2; }

make_base() {
    if podman image exists "$BASE"; then
        return
    fi
    if [ ! -s "$CACHE/debian-bookworm.tar" ]; then
        log "debootstrap of Debian 12 (minbase) from $MIRROR (a few minutes, once)"
        local rootfs
        rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log"
        # The official image's sources (updates and security too), so that the Dockerfiles' pinned versions resolve.
        printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
            "$MIRROR" "$MIRROR" "${MIRROR%/debian}/debian" >"$rootfs/etc/apt/sources.list"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$CACHE/debian-bookworm.tar.tmp" .
        mv "$CACHE/debian-bookworm.tar.tmp" "$CACHE/debian-bookworm.tar"
        rm -rf "$rootfs"
    fi
    log "importing $CACHE/debian-bookworm.tar as $BASE"
    podman import --change 'CMD ["/bin/bash"]' "$CACHE/debian-bookworm.tar" "$BASE" >/dev/null
}

# Where TLS is intercepted by a proxy with its own CA (as on the project's machines), pip inside the build must trust
# what the host trusts: the host's CA bundle and a pip.conf naming it are mounted into the RUN steps only (podman
# build -v), so nothing of them stays in the images.
tls_mounts=()
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$CACHE/tls"
    printf '[global]\ncert = /run/host-ca.crt\n' >"$CACHE/tls/pip.conf"
    tls_mounts=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro -v "$PWD/$CACHE/tls/pip.conf:/etc/pip.conf:ro")
fi

podman_build() {  # podman_build FILE WHEELS [more podman build arguments]
    local file=$1 wheels=$2
    shift 2
    podman build --isolation=chroot --network=host "${tls_mounts[@]}" --build-arg "BASE_IMAGE=$BASE" \
        --build-arg "WHEELS=$wheels" -f "$file" "$@" .
}

build() {  # build FILE TAG WHEELS [more podman build arguments]
    local file=$1 tag=$2 wheels=$3
    shift 3
    log "building $tag from $file"
    podman_build "$file" "$wheels" -t "$tag" "$@"
}

keep_horovod_wheel() {  # keep_horovod_wheel FILE WHEELS [the build's arguments]: the build stage's wheel, for next time
    local file=$1 wheels=$2
    shift 2
    if ls "$wheels"/horovod-*.whl >/dev/null 2>&1; then
        return
    fi
    # With the build's own arguments, so that podman's cache answers and nothing is built again.
    podman_build "$file" "$wheels" "$@" -q --target build -t localhost/distkfac:build-stage >/dev/null
    local root
    root=$(podman image mount localhost/distkfac:build-stage)
    cp "$root"/wheels/horovod-*.whl "$wheels/"
    podman image unmount localhost/distkfac:build-stage >/dev/null
    podman rmi localhost/distkfac:build-stage >/dev/null
}

build_cpu() {
    local wheels=$CACHE/wheels-cpu
    if ! ls "$wheels"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
        # The CPU wheel that pip finds here (PyTorch's CPU index is not reachable from these machines).
        "$PY" -m pip download -q --no-deps "torch==2.13.0+cpu" -d "$wheels"
    fi
    build docker/Dockerfile.cpu localhost/distkfac:cpu "$wheels" --build-arg TORCH_INDEX_URL=
    keep_horovod_wheel docker/Dockerfile.cpu "$wheels" --build-arg TORCH_INDEX_URL=
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cpu gpu-base)
make_base
for target in "${targets[@]}"; do
    case $target in
        base) ;;
        cpu) build_cpu ;;
        gpu-base) build docker/Dockerfile localhost/distkfac:gpu-build-base "$CACHE/wheels-gpu" --target build-base ;;
        gpu)
            build docker/Dockerfile localhost/distkfac:gpu "$CACHE/wheels-gpu"
            keep_horovod_wheel docker/Dockerfile "$CACHE/wheels-gpu"
            ;;
        *) log "unknown target $target: use base, cpu, gpu-base or gpu"; exit 2 ;;
    esac
done
# No `podman image prune` here: the untagged images it removes are the layer cache that makes the next build quick.
