#!/usr/bin/env bash
# Build styleblend's images from deploy/docker/Dockerfile, one per target, tagged
# REPO:VERSION-TARGET (one release: every target from one commit, deploy/README.md).
#
#   deploy/images/build.sh [--dry-run] TARGET...     e.g. gateway features blending reconstruction
#
# Environment (all optional):
#   IMAGE_TOOL       buildah (default when installed), podman or docker
#   IMAGE_REPO       default localhost/styleblend
#   VERSION          default: pyproject.toml's version
#   PYTHON_IMAGE     base of the CPU images; unset: the Dockerfile's python:3.11-slim-bookworm
#   CUDA_IMAGE       base of the GPU images; unset: the Dockerfile's nvidia/cuda:...
#                    (buildah and podman are given these two defaults with their registry,
#                    docker.io, as they resolve no short names without a registries.conf)
#   TORCH_INDEX_URL  where the CPU images' torch comes from; unset: the Dockerfile's (PyTorch's
#                    CPU index) when it answers, else PyPI's, which is the CUDA build (a warning
#                    says so: it makes the reconstruction image gigabytes larger)
#   PIP_MOUNTS       1 (default for buildah and podman): give the build's pip this machine's pip
#                    settings (`pip config list`) and bind the local folders and files they name,
#                    read-only, so a machine whose packages come from local indexes builds too.
#                    Docker's build has no bind mounts: there pip uses PyPI.
#   PYTHON           the Python whose pip settings are read (default python3)
#   LOG_DIR          default build/images/logs: one log per target, and times.tsv
# --dry-run prints the command for each target and builds nothing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DOCKERFILE=deploy/docker/Dockerfile
IGNOREFILE=deploy/docker/Dockerfile.dockerignore
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_TARGETS=" reconstruction cpu " # the targets built on the Dockerfile's build-torch-cpu
GPU_TARGETS=" features-gpu reconstruction-gpu gpu " # the targets on CUDA_IMAGE

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
    dry_run=1
    shift
fi
if [[ $# -eq 0 ]]; then
    echo "usage: $0 [--dry-run] TARGET..." >&2
    exit 2
fi

if [[ -z ${IMAGE_TOOL:-} ]]; then
    for tool in buildah podman docker; do
        if command -v "$tool" >/dev/null; then IMAGE_TOOL=$tool && break; fi
    done
fi
case ${IMAGE_TOOL:-} in
buildah | podman | docker) ;;
*)
    echo "error: IMAGE_TOOL must be buildah, podman or docker (got '${IMAGE_TOOL:-none found}')" >&2
    exit 2
    ;;
esac
IMAGE_REPO=${IMAGE_REPO:-localhost/styleblend}
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)}
LOG_DIR=${LOG_DIR:-$ROOT/build/images/logs}
WORK=${WORK:-$ROOT/build/images}
if [[ $IMAGE_TOOL == docker ]]; then PIP_MOUNTS=${PIP_MOUNTS:-0}; else PIP_MOUNTS=${PIP_MOUNTS:-1}; fi

# --- this machine's pip settings, for the build's pip (buildah and podman only) --------------
mounts=()
add_mount() { # a local path named by a pip setting, at the same place in the build, read-only
    local path=$1
    [[ -e $path ]] || return 0
    for existing in "${mounts[@]}"; do [[ $existing == "$path:$path:ro" ]] && return 0; done
    mounts+=("$path:$path:ro")
}
pip_settings() {
    local pip_conf=$WORK/pip.conf line key value name word
    local -A setting=() from_env=()
    # `pip config list` prints key='value'; an :env: line (PIP_* variables) wins over the files'.
    while IFS= read -r line; do
        key=${line%%=*} value=${line#*=}
        value=${value#\'} value=${value%\'}
        name=${key##*.}
        if [[ $key == :env:* ]]; then
            from_env[$name]=1
        elif [[ -n ${from_env[$name]:-} ]]; then
            continue
        fi
        setting[$name]=$value
    done < <("${PYTHON:-python3}" -m pip config list 2>/dev/null || true)
    [[ ${#setting[@]} -gt 0 ]] || return 0
    mkdir -p "$WORK"
    {
        echo "# from \`pip config list\` on $(hostname) by deploy/images/build.sh"
        echo "[global]"
        for name in "${!setting[@]}"; do echo "$name = ${setting[$name]}"; done
    } >"$pip_conf"
    mounts+=("$pip_conf:/etc/pip.conf:ro")
    for name in find-links index-url extra-index-url constraint requirement cert client-cert; do
        for word in ${setting[$name]:-}; do
            word=${word#file://}
            [[ $word == /* ]] || continue
            # A local "simple" index links to its files beside it (../files): bind its parent.
            if [[ $(basename "$word") == simple ]]; then word=$(dirname "$word"); fi
            add_mount "$word"
        done
    done
}
if [[ $PIP_MOUNTS == 1 ]]; then pip_settings; fi

qualified() { # the Dockerfile's default for ARG $1, with its registry: docker.io/library/python:…
    local name
    name=$(sed -n "s/^ARG $1=//p" "$ROOT/$DOCKERFILE" | head -1)
    if [[ $name != */* ]]; then
        echo "docker.io/library/$name" # an official image: python:3.11-slim-bookworm
    elif [[ ${name%%/*} == *.* || ${name%%/*} == *:* || ${name%%/*} == localhost ]]; then
        echo "$name" # names its registry already
    else
        echo "docker.io/$name"
    fi
}

torch_index() { # the Dockerfile's CPU index when it answers; else PyPI's, with a warning
    if [[ -n ${TORCH_INDEX_URL:-} ]]; then
        echo "$TORCH_INDEX_URL"
    elif curl -fsS --max-time 15 -o /dev/null "$CPU_TORCH_INDEX/torch/" 2>/dev/null; then
        echo "$CPU_TORCH_INDEX"
    else
        echo "warning: $CPU_TORCH_INDEX cannot be reached: torch comes from PyPI," \
            "its CUDA build (gigabytes of CUDA libraries; the image still runs on the CPU)" >&2
        echo https://pypi.org/simple
    fi
}

command_for() { # the build command of one target, one word a line
    local target=$1 tag=$2
    case $IMAGE_TOOL in
    buildah) printf '%s\n' buildah bud --isolation "${BUILDAH_ISOLATION:-chroot}" ;;
    podman) printf '%s\n' podman build ;;
    docker) printf '%s\n' docker build ;;
    esac
    printf '%s\n' -f "$DOCKERFILE" --target "$target" -t "$tag"
    if [[ $IMAGE_TOOL != docker ]]; then
        # BuildKit reads Dockerfile.dockerignore beside the Dockerfile by itself; these are told.
        # --layers keeps each step's result, so targets share the stubs, the sources and the
        # base venv; --force-rm removes the build's containers even when it fails.
        printf '%s\n' --ignorefile "$IGNOREFILE" --layers --force-rm
        for mount in "${mounts[@]}"; do printf '%s\n' --volume "$mount"; done
    fi
    local python_image=${PYTHON_IMAGE:-} cuda_image=${CUDA_IMAGE:-}
    if [[ $IMAGE_TOOL != docker ]]; then
        python_image=${python_image:-$(qualified PYTHON_IMAGE)}
        cuda_image=${cuda_image:-$(qualified CUDA_IMAGE)}
    fi
    if [[ -n $python_image ]]; then printf '%s\n' --build-arg "PYTHON_IMAGE=$python_image"; fi
    if [[ -n $cuda_image && $GPU_TARGETS == *" $target "* ]]; then
        printf '%s\n' --build-arg "CUDA_IMAGE=$cuda_image"
    fi
    if [[ $TORCH_TARGETS == *" $target "* ]]; then
        printf '%s\n' --build-arg "TORCH_INDEX_URL=$(torch_index)"
    fi
    printf '%s\n' .
}

image_size() { # as the tool shows it: uncompressed layers (buildah and docker in MB, 10^6 bytes)
    case $IMAGE_TOOL in
    buildah) buildah images --format '{{.Size}}' "$1" ;;
    *) "$IMAGE_TOOL" image ls --format '{{.Size}}' "$1" ;;
    esac
}

cd "$ROOT"
mkdir -p "$LOG_DIR"
for target in "$@"; do
    tag="$IMAGE_REPO:$VERSION-$target"
    mapfile -t argv < <(command_for "$target" "$tag")
    if [[ $dry_run == 1 ]]; then
        printf '%q ' "${argv[@]}"
        echo
        continue
    fi
    log=$LOG_DIR/$target.log
    echo "building $tag with $IMAGE_TOOL (log: ${log#"$ROOT"/})"
    started=$SECONDS
    if ! "${argv[@]}" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "error: building $target failed; the whole log is $log" >&2
        exit 1
    fi
    took=$((SECONDS - started))
    size=$(image_size "$tag")
    printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$target" "$tag" "$took" "$size" \
        >>"$LOG_DIR/times.tsv"
    echo "built $tag in ${took}s: $size"
done
