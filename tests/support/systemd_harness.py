"""Boot a real systemd as PID 1 of a private, isolated namespace, for tests.

This is a test helper, not a test module. It is used by tests/test_systemd_real.py. The shell
script that runs as PID 1 of the namespace lives next to it, in systemd-inner.sh.

Why the isolation matters: a systemd booted as ``unshare --pid --fork --mount-proc systemd``
without further isolation empties the host's /tmp (systemd-tmpfiles), writes into the host's
/run/systemd, starts gettys on the console and ignores SIGTERM (it is PID 1 of its namespace).
See the real-systemd notes.

What this module does:

* The launcher is started in its own session (stdin from /dev/null, output to a log file) and
  runs ``unshare --pid --fork --mount --uts --cgroup --mount-proc <inner script>``.
  Before ``unshare`` runs, the launcher moves itself into freshly created child cgroups (one per
  cgroup hierarchy), so that the cgroup namespace, and everything systemd creates in it, lives
  under a subtree this module owns and removes at teardown. (It also keeps systemd from setting
  the host's cgroup v1 ``release_agent``, which the kernel refuses inside a cgroup namespace.)
* The inner script (PID 1 of the new namespaces) makes every mount private, mounts fresh tmpfs
  on /tmp, /var/tmp, /run, /var/lib/systemd, /var/log/journal (if present) and
  /etc/systemd/system, remounts the cgroup hierarchies (so they show the namespace's subtree),
  masks the units that would touch the host (gettys, logind, tmpfiles, udev, sysctl,
  modules-load, binfmt, random-seed, sysusers, utmp, timesyncd, fsck, swap, ...), links
  default.target to multi-user.target and then REFUSES TO BOOT (exit 3 with a message) unless
  /tmp is a fresh, empty tmpfs in which a marker file created in the host's /tmp is not
  visible. Only then does it ``exec`` systemd (with ``container=`` set, so systemd also skips
  what it skips in containers).
* Exposed paths (``expose=``): directories the caller needs inside the namespace that lie under
  a prefix replaced by a fresh tmpfs (/tmp, /var/tmp, /run), e.g. a checkout and its virtual
  environment cloned under /tmp. BEFORE the tmpfs mounts, the inner script bind-mounts each
  onto an empty stash directory under ``workdir`` (inside the private mount namespace only);
  then it mounts the tmpfs and runs the isolation checks unchanged (empty /tmp, host marker not
  visible); only AFTER the checks does it create each original path inside the fresh tmpfs and
  bind-mount the stash back onto it, read-only. Nothing is written to the host's /tmp (the
  ``mkdir -p`` happens in the namespace's tmpfs) and no mount reaches the host (all of it
  happens after ``mount --make-rprivate /``).
* Teardown: SIGKILL to the namespace's PID 1 (which ends every process of the PID namespace),
  then the launcher, then any process left in the cgroup subtree, then the subtree itself.

Use::

    with booted_systemd(workdir) as sd:
        sd.wait_running()
        sd.install_unit("x.service", text)
        sd.systemctl("start", "x.service", check=True)
        print(sd.journalctl("-u", "x.service").stdout)

``workdir`` must be outside /tmp, /var/tmp and /run: those are fresh tmpfs inside the namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD_CANDIDATES = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
REQUIRED_TOOLS = ("unshare", "nsenter", "mount", "systemctl", "journalctl")
# Paths that are replaced by an empty tmpfs inside the namespace: a work tree under them
# would be invisible to the booted systemd and its services.
HIDDEN_PREFIXES = ("/tmp", "/var/tmp", "/run", "/dev/shm")
# The prefixes the inner script replaces with a fresh tmpfs: paths under them can be exposed
# (bind-mounted back at their original place after the isolation checks). /dev/shm is the
# host's inside the namespace (hidden only from services with PrivateDevices=), so a path there
# needs no exposing, and nothing may be created there.
REPLACED_PREFIXES = ("/tmp", "/var/tmp", "/run")

# Units masked (linked to /dev/null) inside the namespace, because they would touch the host
# (its /tmp, /dev, kernel settings, clock, consoles, users, disks) or are useless here.
MASKED_UNITS = (
    # consoles: a getty on the console disturbs the calling terminal
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "container-getty@.service",
    "getty-static.service",
    "getty.target",
    "systemd-ask-password-wall.path",
    "systemd-ask-password-console.path",
    "systemd-logind.service",
    "systemd-user-sessions.service",
    # tmpfiles: "D /tmp" in tmp.conf empties /tmp
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
    # devices, kernel, clock, file systems: all shared with the host
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-hwdb-update.service",
    "kmod-static-nodes.service",
    "systemd-sysctl.service",
    "systemd-modules-load.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-timesyncd.service",
    "systemd-time-wait-sync.service",
    "systemd-remount-fs.service",
    "systemd-fsck-root.service",
    "systemd-fsck@.service",
    "systemd-repart.service",
    "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service",
    "systemd-pcrphase-initrd.service",
    "swap.target",
    "cryptsetup.target",
    "veritysetup.target",
    "integritysetup.target",
    "remote-cryptsetup.target",
    "remote-veritysetup.target",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    # state in /etc, /var: users, machine id, seeds, utmp/wtmp, caches
    "systemd-sysusers.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "systemd-random-seed.service",
    "systemd-update-done.service",
    "systemd-journal-catalog-update.service",
    "ldconfig.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "systemd-journald-audit.socket",
    # not needed: systemctl talks to PID 1 over /run/systemd/private
    "dbus.service",
    "dbus.socket",
)

# PID 1 of the namespace: sets up the isolation, checks it, then execs systemd. A file of its own
# (read at run time, copied into the workdir) so that it can be read and linted as shell.
INNER_SCRIPT_PATH = Path(__file__).with_name("systemd-inner.sh")


class SystemdUnavailable(RuntimeError):
    """Raised by check_prerequisites() when this machine cannot run the harness."""


def _under(path: Path, prefix: Path) -> bool:
    return path == prefix or prefix in path.parents


def outermost(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Resolved (realpath) directories, without those inside another one of the list; sorted."""
    resolved = sorted({Path(os.path.realpath(p)) for p in paths})
    result: list[Path] = []
    for path in resolved:
        if not any(_under(path, kept) for kept in result):
            result.append(path)
    return result


def paths_to_expose(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The subset of ``paths`` (resolved, outermost only) that the tmpfs mounts inside the
    namespace would hide, i.e. that ``booted_systemd(expose=...)`` has to bind back."""
    result = []
    for path in outermost(paths):
        if any(_under(path, Path(prefix)) for prefix in REPLACED_PREFIXES):
            if str(path) in REPLACED_PREFIXES:
                raise ValueError(f"cannot expose {path} itself: that would undo the isolation")
            if "\n" in str(path) or not path.is_dir():
                raise ValueError(f"cannot expose {path}: not a directory (or odd name)")
            result.append(path)
    return result


def is_hidden(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (resolved) is under a prefix that is not the host's inside the
    namespace or inside a hardened service (/tmp, /var/tmp, /run, /dev/shm)."""
    resolved = Path(os.path.realpath(path))
    return any(_under(resolved, Path(prefix)) for prefix in HIDDEN_PREFIXES)


def find_systemd() -> str | None:
    for path in SYSTEMD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def check_prerequisites() -> None:
    """Raise SystemdUnavailable with a reason when the harness cannot run here."""
    if os.geteuid() != 0:
        raise SystemdUnavailable("needs root (unshare/mount/nsenter of a PID namespace)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise SystemdUnavailable(f"missing tools: {', '.join(missing)}")
    if find_systemd() is None:
        raise SystemdUnavailable(f"no systemd binary at {' or '.join(SYSTEMD_CANDIDATES)}")
    if not Path("/proc/self/ns/cgroup").exists():
        raise SystemdUnavailable("kernel without cgroup namespaces")


# --- cgroups -----------------------------------------------------------------------------


def _cgroup_mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of the cgroup hierarchies, from mountinfo."""
    result = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        fstype = rfields[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mount_point = fields[4].replace("\\040", " ")
        root = fields[3]
        if root != "/":  # already a namespaced or bind-mounted view: cannot map paths
            continue
        result.append((mount_point, fstype, set(rfields[2].split(","))))
    return result


def _own_cgroup_dirs() -> list[Path]:
    """For every mounted hierarchy, the directory of this process's cgroup in it."""
    mounts = _cgroup_mounts()
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hid, controllers, path = line.split(":", 2)
        for mount_point, fstype, opts in mounts:
            if controllers == "" and fstype == "cgroup2":
                pass
            elif fstype == "cgroup" and controllers and set(controllers.split(",")) <= opts:
                if controllers == "cpuset":
                    # cgroup v1 cpuset children start with no cpus/mems (cannot hold
                    # processes), and systemd does not use cpuset on v1: leave it alone.
                    break
            else:
                continue
            dirs.append(Path(mount_point + path.rstrip("/")))
            break
    return dirs


def _create_cgroups(name: str) -> list[Path]:
    created = []
    for parent in _own_cgroup_dirs():
        child = parent / name
        try:
            child.mkdir()
        except OSError as exc:
            _remove_cgroups(created)
            raise RuntimeError(f"cannot create cgroup {child}: {exc}") from exc
        created.append(child)
    return created


def _cgroup_pids(root: Path) -> set[int]:
    pids: set[int] = set()
    for dirpath, _dirs, files in os.walk(root):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                text = Path(dirpath, "cgroup.procs").read_text()
                pids.update(int(p) for p in text.split())
    return pids


def _remove_cgroups(dirs: list[Path], timeout: float = 10.0) -> list[str]:
    """Kill what is left in the subtrees, then remove them bottom-up. Returns problems."""
    problems = []
    deadline = time.monotonic() + timeout
    for root in dirs:
        while True:
            if not root.exists():
                break
            kill_file = root / "cgroup.kill"  # cgroup v2, kernel >= 5.14
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
            for pid in _cgroup_pids(root):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda t: -len(t[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            if not root.exists():
                break
            if time.monotonic() > deadline:
                problems.append(f"could not remove cgroup {root} (pids {_cgroup_pids(root)})")
                break
            time.sleep(0.1)
    return problems


# --- the handle --------------------------------------------------------------------------


@dataclass
class Handle:
    """A booted, isolated systemd. Commands run inside via nsenter."""

    pid: int  # host PID of the namespace's PID 1 (systemd)
    launcher: subprocess.Popen
    workdir: Path
    log_path: Path
    host_tmp_marker: Path
    cgroups: list[Path] = field(default_factory=list)
    exposed: list[Path] = field(default_factory=list)  # bound back read-only inside

    def run(
        self, *args: str, check: bool = False, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespaces (mount, PID, UTS, cgroup) of the booted systemd."""
        if not self.alive():
            raise RuntimeError(f"the isolated systemd is gone; launcher log:\n{self.log_text()}")
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-C", "--", *args]
        return subprocess.run(
            cmd,
            check=check,
            timeout=timeout,
            input=input,
            text=True,
            capture_output=True,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def systemctl(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", "--no-ask-password", *args, **kwargs)

    def journalctl(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run("journalctl", "--no-pager", *args, **kwargs)

    def alive(self) -> bool:
        try:
            return Path(f"/proc/{self.pid}/comm").read_text().strip() == "systemd"
        except OSError:
            return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_running(self, timeout: float = 60) -> str:
        """Wait until `systemctl is-system-running` says running (or degraded: then raise
        with the failed units, since a degraded boot means the masking list is incomplete)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the isolated systemd died; launcher log:\n{self.log_text()}")
            state = self.systemctl("is-system-running").stdout.strip()
            if state == "running":
                return state
            if state == "degraded":
                failed = self.systemctl("list-units", "--failed", "--plain").stdout
                raise RuntimeError(f"isolated systemd is degraded; failed units:\n{failed}")
            time.sleep(0.25)
        raise TimeoutError(f"isolated systemd not running after {timeout}s (state {state!r})")

    def install_unit(self, name: str, text: str) -> None:
        """Write a unit into the namespace's /etc/systemd/system (a tmpfs) and daemon-reload."""
        target = Path(f"/proc/{self.pid}/root/etc/systemd/system") / name
        target.write_text(text)
        self.systemctl("daemon-reload", check=True)

    def add_user(self, name: str) -> tuple[int, int]:
        """Create a system user and group that exist only inside the namespace.

        Copies of /etc/passwd and /etc/group with the new entries are written to the
        namespace's /run (a tmpfs) and bind-mounted over /etc/passwd and /etc/group in the
        namespace's mount namespace; the host's files are not touched. Services started after
        this call (their mount namespaces are copies of PID 1's) can use ``User=name``.
        Returns (uid, gid).
        """
        root = Path(f"/proc/{self.pid}/root")
        passwd = (root / "etc/passwd").read_text()
        group = (root / "etc/group").read_text()
        used_uids = {int(line.split(":")[2]) for line in passwd.splitlines() if line.count(":") >= 6}
        used_gids = {int(line.split(":")[2]) for line in group.splitlines() if line.count(":") >= 3}
        if any(line.split(":")[0] == name for line in passwd.splitlines()):
            raise ValueError(f"user {name} already exists")
        uid = next(i for i in range(61000, 62000) if i not in used_uids and i not in used_gids)
        harness_run = root / "run/systemd-harness"
        harness_run.mkdir(exist_ok=True)
        (harness_run / "passwd").write_text(
            passwd.rstrip("\n") + f"\n{name}:x:{uid}:{uid}:{name} (test):/nonexistent:/usr/sbin/nologin\n"
        )
        (harness_run / "group").write_text(group.rstrip("\n") + f"\n{name}:x:{uid}:\n")
        for f in ("passwd", "group"):
            (harness_run / f).chmod(0o644)
            self.run("mount", "-n", "--bind", f"/run/systemd-harness/{f}", f"/etc/{f}", check=True)
        return uid, uid

    def kill(self) -> list[str]:
        """SIGKILL PID 1 of the namespace (ends all its processes), the launcher, and anything
        left in the cgroup subtree; remove the subtree and the marker. Idempotent."""
        problems = []
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        try:
            self.launcher.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.launcher.kill()
            try:
                self.launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                problems.append(f"launcher {self.launcher.pid} did not exit")
        problems += _remove_cgroups(self.cgroups)
        self.cgroups = []
        deadline = time.monotonic() + 10
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{self.pid}").exists():
            problems.append(f"systemd pid {self.pid} still exists")
        return problems


def _find_child(parent: int) -> int | None:
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@contextlib.contextmanager
def booted_systemd(
    workdir: Path, boot_timeout: float = 30, expose: Iterable[str | os.PathLike[str]] = ()
) -> Iterator[Handle]:
    """Boot an isolated systemd; yield a Handle; always SIGKILL it at the end.

    ``workdir`` (created if needed) holds the inner script, the launcher log and the stash
    directories of exposed paths; it must not be under /tmp, /var/tmp or /run (those are fresh
    tmpfs inside the namespace). ``expose``: directories that must stay visible inside the
    namespace at their original paths (e.g. the checkout and its virtual environment); those
    under /tmp, /var/tmp or /run are bind-mounted back, read-only, after the isolation checks
    (the others are visible anyway). Call ``handle.wait_running()`` before starting units.
    """
    check_prerequisites()
    workdir = Path(workdir).resolve()
    if is_hidden(workdir):
        raise ValueError(f"{workdir} is hidden inside the namespace; use a path outside /tmp")
    exposed = paths_to_expose(expose)
    workdir.mkdir(parents=True, exist_ok=True)
    systemd = find_systemd()
    assert systemd is not None

    token = uuid.uuid4().hex[:12]
    script = workdir / "systemd-harness-inner.sh"
    script.write_text(INNER_SCRIPT_PATH.read_text())
    script.chmod(0o755)
    log_path = workdir / "systemd-harness-launcher.log"
    # Empty mount points for the exposed paths (bind-mounted inside the namespace only).
    stashes = [workdir / "stash" / str(i) for i in range(len(exposed))]
    for stash in stashes:
        stash.mkdir(parents=True)
        stash.chmod(0o700)
    # A marker in the host's /tmp: the inner script refuses to boot if it can see it.
    marker = Path("/tmp") / f".systemd-harness-marker-{token}"
    marker.write_text("host /tmp; must not be visible inside the isolated systemd\n")

    cgroups: list[Path] = []
    launcher: subprocess.Popen | None = None
    handle: Handle | None = None
    try:
        cgroups = _create_cgroups(f"systemd-harness-{token}")
        procs_files = [str(c / "cgroup.procs") for c in cgroups]

        def enter_cgroups() -> None:  # runs in the child between fork and exec
            for procs in procs_files:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HARNESS_HOST_MNT_NS": os.readlink("/proc/self/ns/mnt"),
            "HARNESS_HOST_CGROUP_NS": os.readlink("/proc/self/ns/cgroup"),
            "HARNESS_HOST_TMP_MARKER": str(marker),
            "HARNESS_MASKED_UNITS": " ".join(MASKED_UNITS),
            "HARNESS_SYSTEMD": systemd,
            "HARNESS_EXPOSE_N": str(len(exposed)),
        }
        for i, (path, stash) in enumerate(zip(exposed, stashes, strict=True)):
            env[f"HARNESS_EXPOSE_PATH_{i}"] = str(path)
            env[f"HARNESS_EXPOSE_STASH_{i}"] = str(stash)
        with open(log_path, "wb") as log:
            launcher = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount", "--uts", "--cgroup",
                 "--propagation", "private", "--mount-proc", "/bin/bash", str(script)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # detached, like `setsid -f`
                env=env,
                preexec_fn=enter_cgroups,
                cwd="/",
            )
        deadline = time.monotonic() + boot_timeout
        pid = None
        while time.monotonic() < deadline:
            if launcher.poll() is not None:
                raise RuntimeError(
                    f"isolated systemd did not start (launcher exit {launcher.returncode}):\n"
                    + log_path.read_text(errors="replace")
                )
            child = _find_child(launcher.pid)
            if child is not None:
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        pid = child
                        break
            time.sleep(0.05)
        if pid is None:
            raise TimeoutError(
                f"systemd did not appear within {boot_timeout}s:\n" + log_path.read_text()
            )
        handle = Handle(pid, launcher, workdir, log_path, marker, cgroups, exposed)
        yield handle
    finally:
        problems: list[str] = []
        if handle is not None:
            problems = handle.kill()
        else:
            if launcher is not None:
                child = _find_child(launcher.pid)
                if child is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    launcher.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    launcher.wait(timeout=10)
            problems = _remove_cgroups(cgroups)
        marker_survived = marker.exists()
        with contextlib.suppress(OSError):
            marker.unlink()
        if not marker_survived:
            problems.append(f"the host /tmp marker {marker} vanished: host /tmp was touched!")
        # The stash mounts existed only in the (now gone) namespace: on the host the stash
        # directories are empty. rmdir, never rmtree: a non-empty one is reported, not emptied.
        for stash in stashes:
            try:
                stash.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"stash {stash} not removed ({exc}); check the host's mounts")
        with contextlib.suppress(OSError):
            (workdir / "stash").rmdir()
        if problems:
            raise RuntimeError("isolated systemd teardown: " + "; ".join(problems))
