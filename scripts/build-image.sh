#!/usr/bin/env bash
# Build nodewise's image without a Docker daemon or a registry, and run it once.
#
#   scripts/build-image.sh [--variant cpu|cuda] [--tag nodewise:0.1.0] [--base IMAGE]
#
# 1. A base: a Debian 12 root filesystem made with debootstrap (from the Debian mirror, a package
#    registry) and imported as localhost/nodewise-base:bookworm, once; --base uses another image.
# 2. buildah bud --isolation chroot of deployments/image/Containerfile, from the committed tree
#    (git archive HEAD: nothing uncommitted, no .venv, no state folder goes in).
# 3. buildah run --isolation chroot of the image: `nodewise --help` (OCI runtimes cannot set
#    rlimits on these machines, so `podman run` fails; buildah's chroot isolation works).
# Prints build seconds and the image size. Needs root, buildah and debootstrap (apt-get install
# buildah debootstrap); not run in CI (it downloads a Debian base and the whole stack).
set -euo pipefail
cd "$(dirname "$0")/.."

variant=cpu
tag=nodewise:$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
base=localhost/nodewise-base:bookworm
while [ $# -gt 0 ]; do
    case "$1" in
        --variant) variant=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        *) echo "error: unknown argument $1; use --variant cpu|cuda, --tag NAME:TAG, --base IMAGE" >&2; exit 2 ;;
    esac
done
case "$variant" in cpu|cuda) ;; *) echo "error: --variant $variant is not known; use cpu or cuda" >&2; exit 2 ;; esac
for tool in buildah git; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found; apt-get install buildah" >&2; exit 1; }
done

work=$(mktemp -d /tmp/nodewise-image.XXXXXX)
trap 'rm -rf "$work"' EXIT

if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    [ "$base" = localhost/nodewise-base:bookworm ] || { echo "error: base image $base not found" >&2; exit 1; }
    command -v debootstrap >/dev/null || { echo "error: debootstrap not found; apt-get install debootstrap" >&2; exit 1; }
    echo "build-image: making the Debian 12 base with debootstrap (once)"
    started=$(date +%s)
    debootstrap --variant=minbase bookworm "$work/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
        >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    ctr=$(buildah from scratch)
    mnt=$(buildah mount "$ctr")
    cp -a "$work/rootfs/." "$mnt/"
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
    buildah commit --quiet "$ctr" "$base" >/dev/null
    buildah rm "$ctr" >/dev/null
    rm -rf "$work/rootfs"
    echo "build-image: base $base in $(( $(date +%s) - started )) s"
fi

# The host's file-based pip mirrors (pip config: find-links, extra-index-url), mounted read-only
# for the build only: where PyTorch's index is not reachable, torch's CPU build comes from there.
mirror_args=()
find_links=$(pip config get global.find-links 2>/dev/null || true)
extra_index=$(pip config get global.extra-index-url 2>/dev/null || true)
for entry in $find_links $extra_index; do
    dir=${entry#file://}
    dir=${dir%/simple}
    [ -d "$dir" ] && mirror_args+=(--volume "$dir:$dir:ro")
done
cert=${PIP_CERT:-$(pip config list 2>/dev/null | sed -n "s/^global\.cert='\(.*\)'$/\1/p")}
if [ -n "$cert" ] && [ -f "$cert" ]; then  # a proxy's CA (not baked in: mounted for the build)
    mirror_args+=(--volume "$cert:/run/nodewise-build-ca.crt:ro" --build-arg PIP_CERT=/run/nodewise-build-ca.crt)
fi
if [ ${#mirror_args[@]} -gt 0 ]; then
    mirror_args+=(--build-arg "PIP_FIND_LINKS=$find_links" --build-arg "PIP_EXTRA_INDEX_URL=$extra_index")
    echo "build-image: using this machine's pip mirrors: $find_links $extra_index"
fi

mkdir "$work/context"
git archive --format=tar HEAD | tar -x -C "$work/context"
echo "build-image: building $tag ($variant) from $(git rev-parse --short HEAD)"
started=$(date +%s)
buildah bud --isolation chroot --layers=false "${mirror_args[@]}" \
    --build-arg BASE="$base" --build-arg VARIANT="$variant" --build-arg REVISION="$(git rev-parse HEAD)" \
    -f deployments/image/Containerfile -t "$tag" "$work/context"
seconds=$(( $(date +%s) - started ))
size=$(buildah images --noheading --format '{{.Size}}' "$tag" 2>/dev/null | head -1)
echo "build-image: $tag built in ${seconds} s"

echo "build-image: running the image (buildah run --isolation chroot): nodewise --help"
ctr=$(buildah from "$tag")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
help=$(buildah run --isolation chroot "$ctr" -- /usr/local/bin/nodewise-entrypoint nodewise --help)
printf '%s\n' "$help" | sed -n '1,5p'
buildah run --isolation chroot "$ctr" -- python -c \
    'import ray, deepspeed, mlflow, prefect, serving.app, serving.deepspeed_worker; print("imports OK: ray", ray.__version__)'
echo "build-image: runs as $(buildah run --isolation chroot "$ctr" -- id -un)"
echo "{\"image\": \"$tag\", \"variant\": \"$variant\", \"build_s\": $seconds, \"size\": \"${size:-?}\"}"
