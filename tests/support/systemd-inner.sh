#!/bin/bash
# PID 1 of a new PID + mount + UTS + cgroup namespace (started by tests/support/systemd_harness.py).
# Sets up isolation, checks that it took, then execs systemd. Refuses to boot otherwise.
set -euo pipefail
refuse() { echo "systemd_harness inner: REFUSING TO BOOT: $*" >&2; exit 3; }

[ "$$" -eq 1 ] || refuse "not PID 1 of a new PID namespace (pid $$)"
[ "$(readlink /proc/self/ns/mnt)" != "$HARNESS_HOST_MNT_NS" ] || refuse "not in a new mount namespace"
[ "$(readlink /proc/self/ns/cgroup)" != "$HARNESS_HOST_CGROUP_NS" ] || refuse "not in a new cgroup namespace"

# Nothing mounted here may propagate to the host.
mount --make-rprivate /

# Exposed paths, step 1 of 2: before the tmpfs mounts hide them, bind-mount each exposed path
# (a directory under /tmp, /var/tmp or /run) onto its empty stash directory under the
# harness's workdir. These mounts exist only in this (private) mount namespace.
expose_n=${HARNESS_EXPOSE_N:-0}
for ((i = 0; i < expose_n; i++)); do
    p_var=HARNESS_EXPOSE_PATH_$i; s_var=HARNESS_EXPOSE_STASH_$i
    orig=${!p_var}; stash=${!s_var}
    case "$orig" in
        /tmp/?*|/var/tmp/?*|/run/?*) ;;
        *) refuse "exposed path $orig is not under /tmp, /var/tmp or /run" ;;
    esac
    [ -d "$orig" ] && [ ! -L "$orig" ] || refuse "exposed path $orig is not a directory"
    [ -d "$stash" ] && [ ! -L "$stash" ] && [ -z "$(ls -A "$stash")" ] \
        || refuse "stash $stash is not an empty directory"
    mount -n --bind "$orig" "$stash"
done

# -n: do not record the mounts in /run/mount/utab (the host's /run until it is replaced).
mount -n -t tmpfs -o mode=755,nosuid,nodev harness-run /run
mount -n -t tmpfs -o mode=1777,nosuid,nodev harness-tmp /tmp
mount -n -t tmpfs -o mode=1777,nosuid,nodev harness-vartmp /var/tmp
mount -n -t tmpfs -o mode=755,nosuid,nodev harness-varlibsystemd /var/lib/systemd
if [ -d /var/log/journal ]; then
    mount -n -t tmpfs -o mode=2755,nosuid,nodev harness-journal /var/log/journal
fi
mount -n -t tmpfs -o mode=755 harness-etc-systemd /etc/systemd/system

# Remount the cgroup hierarchies so they show this cgroup namespace's root (a subtree owned by
# the harness), not the host's whole tree. The old mount must go first: the kernel refuses
# (EBUSY) the same hierarchy on top of itself at the same mount point.
while read -r _src mnt fstype opts _rest; do
    case "$fstype" in
        cgroup|cgroup2) umount -n "$mnt" || umount -n -l "$mnt" ;;
    esac
    case "$fstype" in
        cgroup2) mount -n -t cgroup2 -o nosuid,nodev,noexec harness-cgroup2 "$mnt" ;;
        cgroup)
            sub=$(echo "$opts" | tr ',' '\n' | grep -Ev '^(rw|ro|nosuid|nodev|noexec|relatime|noatime|nodiratime|strictatime)$' | paste -sd, -)
            mount -n -t cgroup -o "nosuid,nodev,noexec,$sub" harness-cgroup "$mnt" ;;
    esac
done < <(awk '$3 == "cgroup" || $3 == "cgroup2"' /proc/self/mounts)

# The isolation took: /tmp is a tmpfs mounted here, empty, and the marker the harness put into
# the host's /tmp is not visible.
[ "$(stat -f -c %T /tmp)" = tmpfs ] || refuse "/tmp is not a tmpfs"
[ -z "$(ls -A /tmp)" ] || refuse "/tmp is not empty"
[ ! -e "$HARNESS_HOST_TMP_MARKER" ] || refuse "host /tmp marker visible: /tmp is the host's /tmp"
[ "$(stat -f -c %T /run)" = tmpfs ] && [ -z "$(ls -A /run)" ] || refuse "/run is not a fresh tmpfs"
[ -z "$(ls -A /etc/systemd/system)" ] || refuse "/etc/systemd/system is not a fresh tmpfs"

# Exposed paths, step 2 of 2 (only now that the isolation is checked): recreate each original
# path inside the fresh tmpfs and bind-mount its stash back onto it, read-only. The stash
# mount is dropped again (the bind onto the original path keeps its own reference).
for ((i = 0; i < expose_n; i++)); do
    p_var=HARNESS_EXPOSE_PATH_$i; s_var=HARNESS_EXPOSE_STASH_$i
    orig=${!p_var}; stash=${!s_var}
    case "$orig" in
        /var/tmp/?*) top=/var/tmp ;;
        /tmp/?*) top=/tmp ;;
        /run/?*) top=/run ;;
        *) refuse "exposed path $orig is not under /tmp, /var/tmp or /run" ;;
    esac
    [ "$(stat -f -c %T "$top")" = tmpfs ] || refuse "$top is not the fresh tmpfs"
    (umask 022 && mkdir -p -- "$orig")
    [ "$(stat -f -c %T "$orig")" = tmpfs ] && [ -z "$(ls -A "$orig")" ] \
        || refuse "$orig is not a new empty directory in the fresh tmpfs"
    mount -n --bind "$stash" "$orig"
    mount -n -o remount,bind,ro "$orig"
    umount -n "$stash"
    echo "systemd_harness inner: exposed $orig (read-only)" >&2
done

for unit in $HARNESS_MASKED_UNITS; do
    ln -s /dev/null "/etc/systemd/system/$unit"
done
ln -s /lib/systemd/system/multi-user.target /etc/systemd/system/default.target
hostname systemd-harness

echo "systemd_harness inner: isolation checked, starting $HARNESS_SYSTEMD" >&2
exec env -i container=systemd-harness "$HARNESS_SYSTEMD" --system --log-target=journal-or-kmsg
