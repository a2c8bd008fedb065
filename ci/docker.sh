#!/usr/bin/env bash
# The Docker leg (called by .ci/run after the suite): builds docker/cuda.Dockerfile and
# docker/gaudi.Dockerfile with podman on a Debian stand-in for their CUDA and Gaudi bases (neither
# can be pulled here: no image registry is reachable), then runs inside each image, with no
# network, `paca --help` and `paca train --max-steps 2` writing into a host folder mounted where
# the image's README command mounts it, as the image's own user. What this proves and what only
# the real bases can: docker/README.md.
#
# Stages (each timed; the totals line at the end is what the leg costs):
#   podman    installed with apt when missing (root only), configured for this leg alone
#   debian    a debootstrap minbase bookworm imported into podman (kept between runs)
#   stand-in  docker/stand-in.Dockerfile on it: python3 + venv + a CPU torch wheel that the host's
#             pip finds (kept between runs, keyed by the recipe: that file, the Debian image, the
#             wheel)
#   cuda, gaudi  the two images, rebuilt every run (all their weight lies after `COPY paca`)
#   run-cuda, run-gaudi  the checks inside each image
# Where podman cannot run (not root, no apt to install it, a runtime that refuses this kernel),
# the leg says why and passes, as ci/serving.sh does without its engines.
#
# Cost, measured on 2 cores shared with other work (load 5-6): about 14 minutes on a machine with
# neither podman nor any image (apt 8-18 s, debootstrap 104-128 s, stand-in 92-141 s, each build
# 170-330 s, each run 64-157 s); 10-14 minutes with the stand-in cached. The leg's last line
# gives each stage's time of the run at hand.
#
# Environment: PACA_DOCKER_CACHE (default ~/.cache/paca-docker): the torch wheel, the pip
# configuration and podman's configuration for the leg; PACA_DEBIAN_MIRROR (default
# deb.debian.org); PACA_DOCKER_CA: the CA bundle that pip inside the builds trusts (default: the
# host's, found below), mounted read-only into each RUN and never copied into a layer.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${PACA_DOCKER_CACHE:-$HOME/.cache/paca-docker}"
mirror="${PACA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
# the torch of ci/install.sh, built for bookworm's python3 (3.11)
torch_version=2.13.0
debian_image="localhost/paca-debian-min:$suite"
leg_start=$SECONDS
timings=()

skip() {
  echo "docker leg skipped: $*"
  exit 0
}
# stage NAME COMMAND...: runs COMMAND and records how long it took
stage() {
  local name=$1 start=$SECONDS
  shift
  echo "docker leg: $name ..."
  "$@"
  timings+=("$name $((SECONDS - start)) s")
  echo "docker leg: $name took $((SECONDS - start)) s"
}

# --- podman ------------------------------------------------------------------------------------
install_podman() {
  if command -v podman > /dev/null && command -v runc > /dev/null \
    && command -v debootstrap > /dev/null; then
    return
  fi
  if ! command -v apt-get > /dev/null; then
    skip "podman, runc or debootstrap is missing and there is no apt-get to install them"
  fi
  # a failed install (no Debian mirror) is this machine's limit, not a failure of the images
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    podman runc debootstrap; } > "$cache/apt.log" 2>&1; then
    tail -5 "$cache/apt.log"
    skip "apt-get could not install podman runc debootstrap (log: $cache/apt.log)"
  fi
}
if [ "$(id -u)" != 0 ]; then
  # the stand-in base is a debootstrap and the checks chown a folder to the image's user
  skip "the leg runs rootful podman and debootstrap: run it as root"
fi
mkdir -p "$cache"
stage podman install_podman

# A containers.conf for this leg alone (CONTAINERS_CONF replaces the system's), so the machine's
# own podman setup is neither needed nor changed. runc with cgroupfs: crun refuses hosts whose
# cgroups are in hybrid mode, and cgroupfs needs no systemd. No default ulimits: podman's
# defaults can exceed the host's hard limits (setrlimit RLIMIT_NOFILE: Operation not permitted);
# containers inherit the host's instead.
export CONTAINERS_CONF="$cache/containers.conf"
cat > "$CONTAINERS_CONF" << 'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
if ! podman info > "$cache/podman-info.log" 2>&1; then
  tail -5 "$cache/podman-info.log"
  skip "podman cannot run here (podman info failed; log: $cache/podman-info.log)"
fi

# --- the Debian base ---------------------------------------------------------------------------
make_debian() {
  if podman image exists "$debian_image"; then
    return
  fi
  local root
  root="$(mktemp -d "$cache/debootstrap.XXXXXX")"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" > "$cache/debootstrap.log" 2>&1 || {
    tail -5 "$cache/debootstrap.log"
    rm -rf "$root"
    echo "debootstrap of $suite from $mirror failed (log: $cache/debootstrap.log)"
    return 1
  }
  tar -C "$root" -c . | podman import - "$debian_image" > /dev/null
  rm -rf "$root"
}
stage debian make_debian
# the first container: a runtime that refuses this kernel shows here, not in the middle of a build
if ! podman run --rm --network none "$debian_image" true > "$cache/podman-run.log" 2>&1; then
  tail -5 "$cache/podman-run.log"
  skip "podman cannot start a container here (log: $cache/podman-run.log)"
fi

# --- the stand-in base -------------------------------------------------------------------------
# pip inside the builds reaches PyPI through whatever TLS interception the host trusts: the host's
# CA bundle and a pip.conf naming it are mounted into every RUN (podman build -v), never copied.
ca="${PACA_DOCKER_CA:-}"
if [ -z "$ca" ]; then
  for candidate in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then
      ca="$candidate"
      break
    fi
  done
fi
# podman leaves each mount point in the image as an empty file (as it leaves /etc/resolv.conf):
# check_image makes sure nothing more is there
ca_target=/run/paca-host-ca.crt
pip_target=/etc/pip.conf
mounts=()
pip_conf="$cache/pip.conf"
printf '[global]\n' > "$pip_conf"
if [ -n "$ca" ]; then
  printf 'cert = %s\n' "$ca_target" >> "$pip_conf"
  mounts+=(-v "$ca:$ca_target:ro")
fi
mounts+=(-v "$pip_conf:$pip_target:ro")

# A CPU torch: PyPI's x86_64 torch is the CUDA build (GBs with its nvidia-* wheels), so the wheel
# comes from wherever the host's pip finds a +cpu build (a local wheel folder or index in its
# configuration, or PIP_EXTRA_INDEX_URL naming the PyTorch CPU index), for bookworm's python.
fetch_torch() {
  local wheels="$cache/wheels"
  mkdir -p "$wheels"
  if compgen -G "$wheels/torch-$torch_version+cpu-cp311-*.whl" > /dev/null; then
    return
  fi
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform "manylinux_2_28_$(uname -m)" --dest "$wheels" "torch==$torch_version+cpu" \
    > "$cache/pip-download.log" 2>&1 || {
    tail -5 "$cache/pip-download.log"
    skip "no CPU build of torch $torch_version for python 3.11 is reachable by this machine's pip" \
      "(set PIP_EXTRA_INDEX_URL to an index that has one; log: $cache/pip-download.log)"
  }
}
stage torch-wheel fetch_torch
wheel="$(compgen -G "$cache/wheels/torch-$torch_version+cpu-cp311-*.whl" | head -1)"

# the cache key: everything the stand-in is made of
key="$({
  cat docker/stand-in.Dockerfile
  podman image inspect --format '{{.Id}}' "$debian_image"
  basename "$wheel"
} | sha256sum | cut -c1-12)"
stand_in="localhost/paca-stand-in:$key"
build_stand_in() {
  if podman image exists "$stand_in"; then
    echo "stand-in base cached: $stand_in"
    return
  fi
  local context
  context="$(mktemp -d)" # the recipe needs no files; the wheel arrives by a read-only mount
  podman build --layers=false -f docker/stand-in.Dockerfile -t "$stand_in" \
    --build-arg "DEBIAN_IMAGE=$debian_image" --build-arg "TORCH_VERSION=$torch_version" \
    "${mounts[@]}" -v "$cache/wheels:/wheels:ro" "$context"
  rmdir "$context"
  # stand-ins of older recipes are never used again
  podman images --format '{{.Repository}}:{{.Tag}}' localhost/paca-stand-in \
    | grep -v -x -F "$stand_in" | xargs -r podman rmi > /dev/null || true
}
stage stand-in build_stand_in

# --- the two images ----------------------------------------------------------------------------
build_image() {
  local name=$1 tag="localhost/paca:$1-stand-in" old
  shift
  old="$(podman image inspect --format '{{.Id}}' "$tag" 2> /dev/null || true)"
  podman build --layers=false -f "docker/$name.Dockerfile" -t "$tag" "$@" "${mounts[@]}" .
  # the image this run replaced, now untagged (only ours: nothing else on the machine is pruned)
  if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$tag")" ]; then
    podman rmi "$old" > /dev/null 2>&1 || true
  fi
}
stage cuda build_image cuda --build-arg "BASE_IMAGE=$stand_in"
stage gaudi build_image gaudi --build-arg "BASE_IMAGE=$stand_in" \
  --build-arg "BUILDER_IMAGE=$stand_in"

# --- inside each image -------------------------------------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
check_image() {
  local name=$1 tag="localhost/paca:$1-stand-in" user workdir uid out owner
  user="$(podman image inspect --format '{{.Config.User}}' "$tag")"
  workdir="$(podman image inspect --format '{{.Config.WorkingDir}}' "$tag")"
  uid="${user%%:*}"
  uid="${uid:-0}"
  podman run --rm --network none "$tag" --help > /dev/null
  # the CA bundle and pip.conf were mounted into the build, never copied: at most empty stubs
  podman run --rm --network none --entrypoint sh "$tag" -c \
    'for f in "$@"; do if [ -s "$f" ]; then echo "$f is in the image"; exit 1; fi; done' \
    sh "$ca_target" "$pip_target"
  # a host folder owned by the image's user, mounted under its working directory as the README's
  # command does; the run must write its output there as that user
  out="$work/$name"
  mkdir -p "$out"
  chown "$uid" "$out"
  # --network none: the model is in the image or the run fails. Small batch and evaluation: the
  # point is the path through the image, not the score.
  podman run --rm --network none -v "$out:$workdir/out" "$tag" \
    train --max-steps 2 --batch-size 2 --eval-examples 4 --output out/paca-out
  for file in metrics.json train_config.json; do
    [ -f "$out/paca-out/$file" ] || {
      echo "$name: the run wrote no $file" && return 1
    }
  done
  owner="$(stat -c %u "$out/paca-out/metrics.json")"
  [ "$owner" = "$uid" ] || {
    echo "$name: output owned by uid $owner, not the image's user ($uid)" && return 1
  }
  echo "$name image: paca --help, paca train --max-steps 2 offline; output written by uid $uid:"
  ls "$out/paca-out"
}
stage run-cuda check_image cuda
stage run-gaudi check_image gaudi

echo "docker leg passed in $((SECONDS - leg_start)) s: $(
  IFS=,
  echo "${timings[*]}"
)"
