"""Tests against a real systemd, booted isolated by tests/support/systemd_harness.py.

Skipped when not root or when unshare/nsenter/systemd are missing, unless
IMAGE_SEARCH_TESTS_REQUIRE_SYSTEMD=1 is set (as .ci/run does): then that is a failure.

Work trees live under <repo>/.pytest-systemd-tmp/ (git-ignored), not under /tmp: inside the
namespace /tmp is a fresh, empty tmpfs, so pytest's tmp_path would be invisible to the units.
When the checkout itself is under such a prefix (CI may clone into /tmp), they live under
/var/cache/image-search-tests/ instead (not ~/.cache: ProtectHome= of the hardened unit would
hide it), removed at teardown; and the checkout, the virtual environment and the interpreter
are exposed inside the namespace (bind-mounted back read-only by the harness, after its
isolation checks) and inside the test units (BindReadOnlyPaths=, past PrivateTmp=/ProtectHome=).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.support import systemd_harness
from tests.support.files import write_config
from tests.support.waiting import poll_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
UNIT_FILE = REPO / "systemd" / "image-search.service"
# The unit's cache directory in Environment= values: the test points those paths into its tree.
CACHE_DIRECTORY = "%C/image-search/"
# Outside the prefixes that are fresh tmpfs inside the namespace (see the module docstring).
FALLBACK_TMP_ROOT = Path("/var/cache/image-search-tests")
SYSTEMD_TMP_ROOT = (
    FALLBACK_TMP_ROOT if systemd_harness.is_hidden(REPO) else REPO / ".pytest-systemd-tmp"
)
REQUIRE = os.environ.get("IMAGE_SEARCH_TESTS_REQUIRE_SYSTEMD") == "1"
VENV_BIN = Path(sys.executable).parent
# Home-like prefixes hidden by ProtectHome=.
HOME_PREFIXES = (Path("/root"), Path("/home"), Path("/run/user"))
# Prefixes replaced by PrivateTmp=.
PRIVATE_TMP_PREFIXES = (Path("/tmp"), Path("/var/tmp"))


def needed_paths() -> list[Path]:
    """Directories the units and probes need (resolved, outermost only): the checkout (the
    editable install points into it), the virtual environment and the interpreter, also where
    the venv's python symlink really points."""
    return systemd_harness.outermost(
        [
            REPO,
            sys.prefix,
            sys.base_prefix,
            Path(sys.executable).parent,
            Path(os.path.realpath(sys.executable)).parent,
            Path(os.path.realpath(VENV_BIN / "python")).parent,
        ]
    )


def _under_any(path: Path, prefixes) -> bool:
    return any(path == p or p in path.parents for p in prefixes)


def _mounts_under(path: Path) -> list[str]:
    """Mount points (in this process's mount namespace) at or below ``path``."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = Path(line.split()[4].replace("\\040", " "))
        if _under_any(mount_point, (path,)):
            found.append(str(mount_point))
    return found


def _require_systemd() -> None:
    try:
        systemd_harness.check_prerequisites()
    except systemd_harness.SystemdUnavailable as exc:
        if REQUIRE:
            pytest.fail(f"IMAGE_SEARCH_TESTS_REQUIRE_SYSTEMD=1 but cannot boot systemd: {exc}")
        pytest.skip(f"cannot boot an isolated systemd here: {exc}")


@pytest.fixture
def systemd_workdir(request):
    """A fresh directory under SYSTEMD_TMP_ROOT (outside /tmp, /var/tmp, /run), removed
    afterwards (and SYSTEMD_TMP_ROOT too when it is the /var/cache fallback and empty)."""
    SYSTEMD_TMP_ROOT.mkdir(parents=True, exist_ok=True)
    SYSTEMD_TMP_ROOT.chmod(0o755)  # the units' user must be able to reach the trees
    path = SYSTEMD_TMP_ROOT / f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    path.chmod(0o755)
    yield path
    mounts = _mounts_under(path)
    # The harness's bind mounts live only in its namespace; if one ever showed up here,
    # rmtree would delete the bound directory's contents (the checkout): refuse instead.
    assert not mounts, f"mounts under {path} on the host, not removing it: {mounts}"
    shutil.rmtree(path, ignore_errors=True)
    if SYSTEMD_TMP_ROOT == FALLBACK_TMP_ROOT:
        with contextlib.suppress(OSError):
            SYSTEMD_TMP_ROOT.rmdir()


@pytest.fixture
def isolated_systemd(systemd_workdir, request):
    """A booted, isolated systemd (Handle). SIGKILLed at the end whatever happens."""
    _require_systemd()
    with systemd_harness.booted_systemd(
        systemd_workdir / "harness", expose=needed_paths()
    ) as handle:
        # Belt and braces: the context manager kills it too; kill() is idempotent.
        request.addfinalizer(handle.kill)
        handle.wait_running(timeout=60)
        yield handle


def _show(sd, unit: str, *props: str) -> dict[str, str]:
    out = sd.systemctl("show", unit, *(f"-p{p}" for p in props), check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _diagnostics(sd, unit: str) -> str:
    status = sd.systemctl("status", unit)
    journal = sd.journalctl("-u", unit, "-o", "short-monotonic", "-n", "200")
    return f"--- systemctl status\n{status.stdout}{status.stderr}\n--- journal\n{journal.stdout}"


# What both stand-in services start with: sd_notify over $NOTIFY_SOCKET and a SIGTERM flag.
NOTIFY_PRELUDE = r'''
import os, signal, socket, sys, time

def notify(message):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)

stopping = False
def on_term(signum, frame):
    global stopping
    stopping = True
signal.signal(signal.SIGTERM, on_term)
'''

# A Type=notify service: READY=1 and STATUS= over $NOTIFY_SOCKET after a delay, a warning line
# with the <4> syslog prefix, an info line, watchdog pings, a last line on SIGTERM.
NOTIFY_SCRIPT = NOTIFY_PRELUDE + r'''
print("smoke: starting, pid %d" % os.getpid(), flush=True)
time.sleep(float(os.environ.get("SMOKE_READY_DELAY", "1.5")))
print("<4>smoke: this is a warning line", flush=True)
print("smoke: this is an info line", flush=True)
notify("READY=1\nSTATUS=smoke: ready, 3 items indexed")
while not stopping:
    notify("WATCHDOG=1")
    time.sleep(0.2)
notify("STOPPING=1")
print("smoke: got SIGTERM, exiting cleanly", flush=True)
sys.exit(0)
'''


def test_isolated_systemd_runs_a_notify_unit(isolated_systemd, systemd_workdir):
    sd = isolated_systemd
    script = systemd_workdir / "smoke_notify.py"
    script.write_text(NOTIFY_SCRIPT)
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    sd.install_unit(
        "smoke.service",
        textwrap.dedent(f"""\
            [Unit]
            Description=harness smoke test notify unit

            [Service]
            Type=notify
            NotifyAccess=main
            ExecStart={python} -u {script}
            Environment=SMOKE_READY_DELAY=1.5
            WatchdogSec=10
            TimeoutStartSec=30
            TimeoutStopSec=10
            """),
    )

    started = time.monotonic()
    start = sd.systemctl("start", "smoke.service", timeout=60)
    elapsed = time.monotonic() - started
    assert start.returncode == 0, start.stderr + _diagnostics(sd, "smoke.service")
    # `systemctl start` of a Type=notify unit returns only after READY=1 (sent after 1.5 s).
    assert elapsed >= 1.4, f"start returned after {elapsed:.2f}s, before READY=1"
    props = _show(sd, "smoke.service", "ActiveState", "SubState", "StatusText")
    assert props["ActiveState"] == "active", props
    assert props["StatusText"] == "smoke: ready, 3 items indexed"

    status = sd.systemctl("status", "smoke.service")
    assert status.returncode == 0, status.stdout
    assert "smoke: ready, 3 items indexed" in status.stdout

    def warnings():
        return sd.journalctl("-u", "smoke.service", "-p", "warning", "-o", "cat").stdout

    assert "smoke: this is a warning line" in poll_until(
        lambda: "warning line" in warnings() and warnings(), 10
    )
    assert "info line" not in warnings()
    assert "smoke: this is an info line" in sd.journalctl("-u", "smoke.service", "-o", "cat").stdout

    stop = sd.systemctl("stop", "smoke.service", timeout=60)
    assert stop.returncode == 0, stop.stderr
    props = _show(sd, "smoke.service", "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props
    assert "got SIGTERM, exiting cleanly" in poll_until(
        lambda: (j := sd.journalctl("-u", "smoke.service", "-o", "cat").stdout)
        and "got SIGTERM" in j
        and j,
        10,
    )
    # The marker the harness put into the host's /tmp is still there (systemd-tmpfiles would
    # have emptied the host's /tmp without the isolation).
    assert sd.host_tmp_marker.exists()


# --- the production unit, adapted for a test tree ----------------------------------------


def derive_test_unit(
    *,
    exec_start: str,
    tree: Path,
    extra_env: dict[str, str] | None = None,
    restart: str = "no",
    timeout_start: int = 300,
) -> str:
    """systemd/image-search.service with its install-specific lines pointed at a test tree.

    Kept from the production unit: Type, NotifyAccess, WatchdogSec, kill settings, User/Group
    (the harness creates the user inside the namespace), and all hardening.
    Changed: ExecStart; ReadWritePaths, WorkingDirectory, the state directory and every
    Environment= path in the cache directory (%C/image-search/..., e.g. HF_HOME) point into
    `tree`; StateDirectory=/CacheDirectory= are dropped (they would create
    /var/lib/image-search and /var/cache/image-search on the host's disk, shared with the
    namespace); EnvironmentFile= is dropped; Restart=no so a failure shows up at once.
    If the Python installation lives under a home-like path (e.g. pyenv in /root, mode 0700),
    ProtectHome=yes would hide it: ProtectHome=tmpfs plus BindReadOnlyPaths= of just that
    installation keeps the rest of /root and /home hidden while the interpreter stays usable.
    Likewise a checkout / venv under /tmp or /var/tmp (PrivateTmp=yes gives the service its
    own) gets a BindReadOnlyPaths= of just that directory.
    """
    env = {
        "IMAGE_SEARCH_STATE_DIRECTORY": str(tree / "state"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **(extra_env or {}),
    }
    home_binds = [p for p in needed_paths() if _under_any(p, HOME_PREFIXES)]
    tmp_binds = [p for p in needed_paths() if _under_any(p, PRIVATE_TMP_PREFIXES)]
    out = []
    for raw in UNIT_FILE.read_text().splitlines():
        line = raw.strip()
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key in ("StateDirectory", "StateDirectoryMode", "CacheDirectory", "CacheDirectoryMode",
                   "EnvironmentFile"):
            continue
        if key == "Environment" and line.split("=", 2)[1] in env:
            continue
        if key == "Environment" and line.split("=", 2)[2].startswith(CACHE_DIRECTORY):
            name, value = line.split("=", 2)[1:]
            raw = f'Environment="{name}={tree / "cache" / value.removeprefix(CACHE_DIRECTORY)}"'
        if key == "ExecStart":
            raw = f"ExecStart={exec_start}"
        elif key == "ReadWritePaths":
            raw = f"ReadWritePaths={tree}"
        elif key == "WorkingDirectory":
            raw = f"WorkingDirectory={tree / 'state'}"
        elif key == "Restart":
            raw = f"Restart={restart}"
        elif key == "TimeoutStartSec":
            raw = f"TimeoutStartSec={timeout_start}"
        elif key == "ProtectHome":
            if home_binds:
                raw = "ProtectHome=tmpfs"
            raw += "".join(f"\nBindReadOnlyPaths={p}" for p in home_binds + tmp_binds)
        elif line == "[Service]":
            raw = "[Service]\n" + "\n".join(f'Environment="{k}={v}"' for k, v in env.items())
        out.append(raw)
    return "\n".join(out) + "\n"


def make_tree(root: Path) -> Path:
    tree = root / "tree"
    for sub in ("images", "inbox", "output", "processed", "state", "cache"):
        (tree / sub).mkdir(parents=True)
    return tree


def chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


# A stand-in for the daemon under the hardened production unit: proves the hardening lets
# CPython, PyTorch and the embedded PostgreSQL (pgserver, with pgvector) work as the
# image-search user, with the data tree writable and READY/STATUS/WATCHDOG going through.
HARDENED_PROBE = NOTIFY_PRELUDE + r'''
from pathlib import Path

tree = Path(sys.argv[1])
import torch
x = torch.randn(128, 128)
checksum = float((x @ x.T).trace())
print(f"probe: torch {torch.__version__} threads={torch.get_num_threads()} ok", flush=True)

import pgserver
server = pgserver.get_server(Path(os.environ["IMAGE_SEARCH_STATE_DIRECTORY"]) / "pg", cleanup_mode="stop")
out = server.psql("CREATE EXTENSION IF NOT EXISTS vector; SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector AS d;")
print("probe: postgres ok: " + " ".join(out.split()), flush=True)

(tree / "output" / "probe.txt").write_text("written by the hardened probe\n")
try:
    Path("/etc/probe-should-fail").write_text("x")
    print("<3>probe: could write to /etc", flush=True)
except OSError as exc:
    import errno
    print(f"probe: writing /etc failed with {errno.errorcode.get(exc.errno)}", flush=True)

notify("READY=1\nSTATUS=probe: torch ok, postgres ok")
while not stopping:
    notify("WATCHDOG=1")
    time.sleep(0.5)
notify("STOPPING=1")
server.cleanup()
print("probe: stopped postgres, exiting", flush=True)
'''


def test_hardened_unit_runs_torch_and_embedded_postgres(isolated_systemd, systemd_workdir):
    """The hardening of systemd/image-search.service, applied by a real systemd 252, still
    lets Python + PyTorch + the embedded PostgreSQL work (without the package itself)."""
    sd = isolated_systemd
    tree = make_tree(systemd_workdir)
    probe = tree / "probe.py"
    probe.write_text(HARDENED_PROBE)
    uid, gid = sd.add_user("image-search")
    chown_tree(tree, uid, gid)
    unit = derive_test_unit(exec_start=f"{VENV_BIN / 'python'} -u {probe} {tree}", tree=tree)
    sd.install_unit("image-search.service", unit)
    verify = sd.run("systemd-analyze", "verify", "/etc/systemd/system/image-search.service")
    assert verify.returncode == 0, verify.stdout + verify.stderr

    start = sd.systemctl("start", "image-search.service", timeout=300)
    assert start.returncode == 0, start.stderr + _diagnostics(sd, "image-search.service")
    props = _show(sd, "image-search.service", "ActiveState", "StatusText", "MainPID")
    assert props["ActiveState"] == "active", _diagnostics(sd, "image-search.service")
    assert props["StatusText"] == "probe: torch ok, postgres ok"
    assert (tree / "output" / "probe.txt").stat().st_uid == uid
    journal = sd.journalctl("-u", "image-search.service", "-o", "cat").stdout
    assert "probe: postgres ok" in journal and "probe: torch" in journal, journal
    # EROFS, not just EACCES: ProtectSystem=strict made it read-only.
    assert "writing /etc failed with EROFS" in journal, journal

    stop = sd.systemctl("stop", "image-search.service", timeout=120)
    assert stop.returncode == 0, stop.stderr
    props = _show(sd, "image-search.service", "ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}, _diagnostics(
        sd, "image-search.service"
    )
    assert "probe: stopped postgres, exiting" in poll_until(
        lambda: (j := sd.journalctl("-u", "image-search.service", "-o", "cat").stdout)
        and "stopped postgres" in j
        and j,
        10,
    )


# --- the real service ---------------------------------------------------------------------


def _service_available() -> tuple[bool, str]:
    exe = VENV_BIN / "image-search"
    if not exe.exists():
        return False, f"{exe} does not exist"
    try:
        res = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return res.returncode == 0, res.stderr[-500:]


def _write_png(path: Path) -> None:
    from PIL import Image

    image = Image.new("RGB", (64, 64))
    image.putdata([(x * 4, y * 4, (x + y) * 2) for y in range(64) for x in range(64)])
    image.save(path, format="PNG")


@pytest.mark.systemd_service
@pytest.mark.timeout(1200)  # its own waits add up to more than the default: a start of up to 600 s, results 180 s
def test_image_search_under_systemd(request, systemd_workdir):
    ok, why = _service_available()
    # A command line that does not start is a failure, wherever this runs (never a skip).
    assert ok, f"`image-search serve --help` fails: {why.strip() or 'no output'}"
    # The fixture (tests/conftest.py) is looked up only once the command line works.
    tiny_model_dir = request.getfixturevalue("tiny_model_dir")

    sd = request.getfixturevalue("isolated_systemd")
    tree = make_tree(systemd_workdir)
    # The model fixture lives under pytest's tmp_path (in /tmp), invisible inside: copy it.
    model = tree / "model"
    shutil.copytree(tiny_model_dir, model)
    config_path = write_config(tree, model_dir=model, device="cpu")

    uid, gid = sd.add_user("image-search")
    chown_tree(tree, uid, gid)
    unit = derive_test_unit(
        exec_start=f"{VENV_BIN / 'image-search'} serve --config {config_path}", tree=tree
    )
    sd.install_unit("image-search.service", unit)

    start = sd.systemctl("start", "image-search.service", timeout=600)
    assert start.returncode == 0, start.stderr + _diagnostics(sd, "image-search.service")
    props = _show(sd, "image-search.service", "ActiveState", "StatusText")
    assert props["ActiveState"] == "active", _diagnostics(sd, "image-search.service")
    assert props["StatusText"], "no STATUS= sent"
    ready_status = props["StatusText"]

    png = systemd_workdir / "sample.png"
    _write_png(png)
    for dest in (tree / "images" / "sample.png",):
        shutil.copy(png, dest)
        os.chown(dest, uid, gid)
    # Give the watcher a chance to index the image before the query arrives.
    poll_until(lambda: _show(sd, "image-search.service", "StatusText")["StatusText"] != ready_status, 30)
    query = tree / "inbox" / "sample.png"
    shutil.copy(png, query)
    os.chown(query, uid, gid)

    def result_files():
        return [p for p in (tree / "output").rglob("*.jsonl") if p.stat().st_size > 0]

    results = poll_until(result_files, 180, interval=0.5)
    assert results, "no .jsonl result in output/\n" + _diagnostics(sd, "image-search.service")
    for line in results[0].read_text().splitlines():
        if line.strip():
            json.loads(line)
    assert results[0].parent != tree / "output", "expected a result folder inside output/"

    status = sd.systemctl("status", "image-search.service").stdout
    print(status)  # shown with -s or when the test fails later
    assert props["StatusText"] in status or "Status:" in status
    # `systemctl status` shows the service's own STATUS= line (read both again until they agree: the
    # service may update its status between the two commands).
    def status_shown() -> bool:
        now = _show(sd, "image-search.service", "StatusText")["StatusText"]
        return bool(now) and f'Status: "{now}"' in sd.systemctl("status", "-l", "image-search.service").stdout
    assert poll_until(status_shown, 30), sd.systemctl("status", "-l", "image-search.service").stdout
    journal = sd.journalctl("-u", "image-search.service", "-o", "cat").stdout
    assert journal.strip()
    assert "Traceback" not in journal, journal

    stop = sd.systemctl("stop", "image-search.service", timeout=120)
    assert stop.returncode == 0, stop.stderr
    props = _show(sd, "image-search.service", "ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}, _diagnostics(
        sd, "image-search.service"
    )
    print(sd.journalctl("-u", "image-search.service", "-o", "short-monotonic").stdout)
    warnings = sd.journalctl("-u", "image-search.service", "-p", "warning", "-o", "cat").stdout
    assert "Traceback" not in warnings, warnings
    # Nothing raw on stderr as the interpreter ends either (a library's report of objects left at exit).
    journal = sd.journalctl("-u", "image-search.service", "-o", "cat").stdout
    assert "service_stopped" in journal and "leaked" not in journal, journal[-3000:]
