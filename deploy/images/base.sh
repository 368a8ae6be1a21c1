#!/usr/bin/env bash
# The local stand-in for python:3.11-slim-bookworm, for machines that cannot pull from Docker
# Hub: Debian bookworm (Python 3.11, what pyproject.toml's requires-python allows) made with
# debootstrap from the apt mirror, imported into buildah's storage as an image. It is made to
# look like python:3.11-slim to the Dockerfile: `python`, `python3` and `pip` on PATH, venv
# works, and `pip install` outside a venv is allowed (the uv stage of the GPU targets does it).
#
#   deploy/images/base.sh [IMAGE]      default localhost/styleblend-python:3.11-bookworm
# Environment: IMAGE_TOOL (buildah, the default when installed, podman or docker), MIRROR (default: the first URI of /etc/apt/sources.list.d/debian.sources, else
# http://deb.debian.org/debian), WORK (scratch folder, default build/images), FORCE=1 rebuilds.
set -euo pipefail

IMAGE=${1:-localhost/styleblend-python:3.11-bookworm}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-$ROOT/build/images}
ROOTFS=$WORK/rootfs-bookworm
SUITE=bookworm
# Python and what python:3.11-slim also has: venv with its pip, pip itself, TLS roots.
PACKAGES=python3,python3-venv,python3-pip,ca-certificates

if [[ -z ${MIRROR:-} ]]; then
    MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

if [[ -z ${IMAGE_TOOL:-} ]]; then
    for tool in buildah podman docker; do
        if command -v "$tool" >/dev/null; then IMAGE_TOOL=$tool && break; fi
    done
fi
case ${IMAGE_TOOL:-} in
buildah) exists() { buildah inspect --type image "$1" >/dev/null 2>&1; } ;;
podman | docker) exists() { "$IMAGE_TOOL" image inspect "$1" >/dev/null 2>&1; } ;;
*)
    echo "error: IMAGE_TOOL must be buildah, podman or docker (got '${IMAGE_TOOL:-none found}')" >&2
    exit 2
    ;;
esac
if [[ ${FORCE:-0} != 1 ]] && exists "$IMAGE"; then
    echo "base image $IMAGE exists (FORCE=1 rebuilds it)"
    exit 0
fi
for tool in "$IMAGE_TOOL" debootstrap; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install -y $tool)" >&2; exit 1; }
done

mkdir -p "$WORK"
rm -rf "$ROOTFS"
echo "debootstrap $SUITE from $MIRROR into $ROOTFS"
# minbase: apt, dpkg and the required packages only (passwd for the images' useradd is one).
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR"

# Make it look like python:3.11-slim: `python` and `pip` beside `python3` on PATH ...
ln -sf /usr/bin/python3 "$ROOTFS/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$ROOTFS/usr/local/bin/pip"
# ... and no PEP 668 marker, which in Debian makes a system-wide `pip install` an error (the
# official image's Python is its own, in /usr/local, and has none).
rm -f "$ROOTFS"/usr/lib/python3.*/EXTERNALLY-MANAGED
# Smaller, as debian:bookworm-slim (python:3.11-slim's base) is: no package lists, downloaded
# .debs, manuals or translations (33 MB), documentation but the copyright files.
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete

ENV_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
DESCRIPTION="Debian $SUITE with Python 3.11 (debootstrap), for styleblend"
if [[ $IMAGE_TOOL != buildah ]]; then
    # Docker and Podman import a tar of the root file system as a one-layer image.
    tar -C "$ROOTFS" -cf - . | "$IMAGE_TOOL" import \
        --change "ENV PATH=$ENV_PATH" --change "ENV LANG=C.UTF-8" --change 'CMD ["python3"]' \
        --change "LABEL org.opencontainers.image.description=\"$DESCRIPTION\"" - "$IMAGE" >/dev/null
    rm -rf "$ROOTFS"
    "$IMAGE_TOOL" image ls "$IMAGE"
    exit 0
fi
container=$(buildah from scratch)
trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
mount=$(buildah mount "$container")
# tar keeps owners, modes and links exactly as debootstrap made them.
tar -C "$ROOTFS" -cf - . | tar -C "$mount" -xpf -
buildah umount "$container" >/dev/null
buildah config --env PATH="$ENV_PATH" --env LANG=C.UTF-8 --cmd python3 \
    --label org.opencontainers.image.description="$DESCRIPTION" "$container"
previous=$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)
buildah commit --quiet --rm "$container" "$IMAGE" >/dev/null
trap - EXIT
# A rebuild (FORCE=1) leaves the old base untagged: remove it unless an image still uses it.
if [[ -n $previous ]]; then buildah rmi "$previous" >/dev/null 2>&1 || true; fi
rm -rf "$ROOTFS"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
