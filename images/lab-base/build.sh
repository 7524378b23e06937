#!/usr/bin/env bash
# Builds the lab base image: Debian 12 with systemd as PID 1, python3, python3-venv and python3-apt
# (which Debian servers carry and Ansible's apt module needs for a dry run, --check).
# Usage: build.sh <image:tag>. Needs root, debootstrap and a Docker Engine.
set -euo pipefail

image=${1:?usage: build.sh <image:tag>}
mirror=${LAB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /var/tmp/celery-fleet-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,python3,python3-apt,python3-venv,iproute2,procps,ca-certificates \
  bookworm "$rootfs" "$mirror" >/dev/null

chroot "$rootfs" /bin/sh -eu <<'CHROOT'
# Units that make no sense in a container and would show up as failed or slow the boot.
for unit in getty.target console-getty.service systemd-remount-fs.service \
            systemd-udevd.service systemd-udev-trigger.service \
            sys-kernel-debug.mount sys-kernel-tracing.mount \
            systemd-journald-audit.socket systemd-modules-load.service \
            systemd-firstboot.service systemd-hwdb-update.service \
            apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer; do
  ln -sf /dev/null "/etc/systemd/system/$unit"
done
# Hostname comes from the container runtime.
rm -f /etc/hostname /etc/machine-id /var/lib/dbus/machine-id
touch /etc/machine-id
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
CHROOT
cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES

tar -C "$rootfs" -c . | docker import \
  --change 'ENV container=docker' \
  --change 'CMD ["/sbin/init"]' \
  - "$image" >/dev/null
