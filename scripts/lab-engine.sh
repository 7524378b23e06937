#!/usr/bin/env bash
# Makes sure a Docker Engine answers and that the lab base image exists.
# The image is rebuilt only when its recipe (images/lab-base/) changes: its tag is the recipe's hash.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
image_repo=celery-fleet-lab-base

log() { printf 'lab-engine: %s\n' "$*" >&2; }

engine_answers() { docker info >/dev/null 2>&1; }

start_engine() {
  if engine_answers; then return; fi
  if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ]; then
    log "no Docker Engine answers. Install and start Docker Engine (https://docs.docker.com/engine/install/),"
    log "make sure 'docker info' works for this user, then run this again."
    exit 1
  fi
  if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    log "installing docker.io and debootstrap from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
  fi
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl start docker
  else
    # No init system on this machine: run the daemon ourselves.
    clear_stale_pid_files
    log "starting dockerd (log: /var/log/dockerd.log)"
    nohup dockerd >/var/log/dockerd.log 2>&1 &
  fi
  for _ in $(seq 120); do
    engine_answers && return
    sleep 1
  done
  log "dockerd did not answer within 120 s; the end of /var/log/dockerd.log:"
  tail -n 15 /var/log/dockerd.log >&2 || true
  exit 1
}

# A machine whose processes were killed (a container or sandbox stopped without a shutdown) keeps
# dockerd's and containerd's pid files. dockerd then refuses to start ("pid file found"), or waits
# for a containerd that is gone when an unrelated process has since taken the recorded pid
# ("containerd is still running" followed by "timeout waiting for containerd to start").
# A pid file is stale unless the process it names is the daemon it belongs to.
clear_stale_pid_files() {
  local file daemon pid
  for file in /var/run/docker.pid:dockerd /var/run/docker/containerd/containerd.pid:containerd; do
    daemon=${file##*:}
    file=${file%:*}
    [ -f "$file" ] || continue
    pid=$(cat "$file" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(ps -p "$pid" -o comm= 2>/dev/null || true)" = "$daemon" ]; then
      continue
    fi
    log "removing the stale $file (pid '${pid}' is not a running $daemon)"
    rm -f "$file"
  done
}

ensure_image() {
  local recipe_hash tag
  recipe_hash=$(cd "$top/images/lab-base" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
  tag="$image_repo:$recipe_hash"
  if ! docker image inspect "$tag" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null 2>&1 || {
      log "debootstrap is needed to build $tag (apt-get install debootstrap)"; exit 1; }
    log "building $tag (Debian 12 with systemd; about a minute)"
    "$top/images/lab-base/build.sh" "$tag"
  fi
  # The inventory names the image by this stable tag.
  docker tag "$tag" "$image_repo:current"
}

start_engine
ensure_image
log "engine answers; image $image_repo:current is ready"
