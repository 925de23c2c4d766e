"""``image-search`` processes without the ten-second import: forked from a parent that imported it once.

Every ``image-search`` run imports torch and transformers first: about 10 s of CPU here (sympy,
torch._dynamo and torch.distributed come in with transformers' modeling code), more than the run
itself, and the end-to-end tests start about a hundred of them. So a test process starts one warm
parent (this module run as ``python -m tests.support.warm SOCKET``: it imports the CLI, the model
code and the service, runs nothing, and waits), and each ``image-search`` the tests start is a fork of
it that then does what a fresh ``image-search`` does: its own pid and session, its own stdin, stdout
and stderr, its cwd, environment and argv, the ``sitecustomize`` its PYTHONPATH names (the induced
faults), ``main()``, the atexit handlers, the exit code. Signals reach it as they reach any process;
the parent reaps it and reports how it ended, so the test's handle is a ``subprocess.Popen`` like any
other (``WarmPopen``).

One parent serves the whole session: under pytest-xdist the controller starts it (``share``, from
``pytest_configure``) and names its socket in the environment (``SOCKET_VARIABLE``), which the workers
and the benchmarks the smoke tests run inherit; importing torch once instead of once per process saves
about ten seconds of CPU per process. Without xdist the test process starts its own on first use.

What a fork cannot give is a different import-time environment, so a run whose environment differs
from the parent's in anything but the service's own settings (and pytest's bookkeeping) starts cold,
the usual way (``warmable``). ``IMAGE_SEARCH_TESTS_COLD=1`` starts every run cold, and so does everything outside the
test session (``enable``: the benchmarks time real starts), except a benchmark the smoke tests run
(``IMAGE_SEARCH_TESTS_WARM=1``: they check its report, not its timings). The real console script is still
run cold by the systemd tests, and by CI's check of the README's commands.
"""

from __future__ import annotations

import array
import atexit
import gc
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Environment variables the forked run may differ in from the parent: read after start-up, never at
# import time. Anything else (HF_*, TORCH*, OMP_*, LD_*...) makes the run start cold. pytest's own,
# the terminal's size, and the cache folder torch's inductor names in a test process's environment
# once it is imported there (read when something is compiled, not at import) are no difference.
_RUN_TIME_VARIABLES = ("IMAGE_SEARCH_", "FAULT_", "STUCK_READ_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM",
                       "PYTHONPATH", "PYTHONUNBUFFERED", "PYTEST_", "COLUMNS", "LINES", "TORCHINDUCTOR_CACHE_DIR")
_MAX_MESSAGE = 1 << 20
# Set by the benchmark's smoke tests for the benchmark they run: its service runs fork too (only the report's
# completeness is checked there, never its timings).
WARM_VARIABLE = "IMAGE_SEARCH_TESTS_WARM"
# The session's shared parent: its socket; its environment is written beside it (``ENV_FILE``).
SOCKET_VARIABLE = "IMAGE_SEARCH_TESTS_WARM_SOCKET"
ENV_FILE = "env.json"


def _send(sock: socket.socket, payload: dict, fds: list[int] = ()) -> None:
    data = json.dumps(payload).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([len(data).to_bytes(4, "big") + data], ancillary)


def _receive(sock: socket.socket) -> tuple[dict, list[int]]:
    data, ancdata, _flags, _addr = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(16 * array.array("i").itemsize))
    while 0 < len(data) < 4:  # a stream may split even the length
        more = sock.recv(4 - len(data))
        if not more:
            break
        data += more
    if len(data) < 4:
        raise EOFError("the warm parent closed the connection")
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    size = int.from_bytes(data[:4], "big")
    body = data[4:]
    while len(body) < size:
        more = sock.recv(size - len(body))
        if not more:
            raise EOFError("the warm parent closed the connection")
        body += more
    return json.loads(body), list(fds)


# --- the warm parent ---------------------------------------------------------------------------------


def _sitecustomize_paths(pythonpath: str, ours: str) -> list[str]:
    known = set(filter(None, ours.split(os.pathsep)))
    return [p for p in pythonpath.split(os.pathsep) if p and p not in known and os.path.isfile(os.path.join(p, "sitecustomize.py"))]


def _become_the_run(request: dict, fds: list[int], listener: socket.socket, conn: socket.socket) -> None:
    """In the forked child: turn into ``image-search ARGS`` as started by the request. Never returns."""
    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        for index, target in enumerate(request["stdio"]):
            if target is not None:
                os.dup2(fds[target], index)
            elif index == 0:  # this process's stdin is the test's line to it: never the run's
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        listener.close()
        conn.close()
        os.closerange(3, 65536)
        os.chdir(request["cwd"])
        ours = os.environ.get("PYTHONPATH", "")
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["args"])
        if request["env"].get("PYTHONUNBUFFERED"):  # as the interpreter's start would have made them
            sys.stdout.reconfigure(write_through=True)
            sys.stderr.reconfigure(write_through=True)
        import runpy

        for path in _sitecustomize_paths(request["env"].get("PYTHONPATH", ""), ours):
            sys.path.insert(0, path)
            runpy.run_path(os.path.join(path, "sitecustomize.py"), run_name="sitecustomize")
        from image_search.cli import main

        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve(path: str) -> None:
    # Everything a run imports before it does anything, imported once, here. Nothing runs: a thread
    # holding a lock when this process forks would leave the child a lock nobody releases.
    import image_search.cli  # noqa: F401
    import image_search.embed  # noqa: F401  (torch, transformers' CLIP)
    import image_search.runtime  # noqa: F401
    import image_search.service  # noqa: F401
    import image_search.sheet  # noqa: F401
    # What loading a checkpoint imports on the way (transformers imports lazily): the modelling code,
    # the tiny test model's classes, the auto classes and the tokenizers.
    import transformers.modeling_utils  # noqa: F401
    from transformers import (  # noqa: F401
        AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPTokenizer)
    from transformers.models.clip import modeling_clip  # noqa: F401

    # What every run shares, frozen: the cyclic garbage collector of each child then skips these objects
    # (and leaves their pages shared with this parent) until the run freezes its own (runtime.py).
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)  # for this parent's last collection (runtime.py says why); a run ends in os._exit
    # No Python thread may run here. numpy's OpenBLAS starts its own pool at import; it is made for
    # forking (pthread_atfork), as every multiprocessing 'fork' user with numpy relies on.
    if threading.active_count() != 1:
        raise SystemExit(f"the warm parent runs {threading.enumerate()} after its imports: it cannot fork safely")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    running: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 0.05)
        if sys.stdin in readable and not sys.stdin.buffer.read1(1):
            break  # the test process is gone
        if listener in readable:
            conn, _ = listener.accept()
            request, fds = _receive(conn)
            pid = os.fork()
            if pid == 0:
                _become_the_run(request, fds, listener, conn)
            for fd in fds:
                os.close(fd)
            _send(conn, {"pid": pid})
            running[pid] = conn
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = running.pop(pid, None)
            if conn is not None:
                try:
                    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                conn.close()
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- the test's side ---------------------------------------------------------------------------------


class WarmParent:
    """A warm parent started by this process, ended with it."""

    def __init__(self, env: dict[str, str], *, wait: bool = True) -> None:
        self.env = dict(env)
        self.path = os.path.join(tempfile.mkdtemp(prefix="image-search-warm-"), "socket")
        Path(self.path).with_name(ENV_FILE).write_text(json.dumps(self.env))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.warm", self.path], env=self.env,
                                     cwd=Path(__file__).resolve().parents[2], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        atexit.register(self.close)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the warm parent did not start ({self.proc.wait()})")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # it ends, and kills what it still runs
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(Path(self.path).parent, ignore_errors=True)  # its socket's folder: none left in /tmp


class SharedParent:
    """The session's warm parent, started by another process (``share``): its socket and environment.
    It is still importing while the first tests run: the socket appears once it is ready."""

    def __init__(self, path: str, *, timeout: float = 300.0) -> None:
        self.path = path
        self.env = json.loads(Path(path).with_name(ENV_FILE).read_text())
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the session's warm parent did not open {path} within {timeout:.0f} s")
            time.sleep(0.1)

    @property
    def alive(self) -> bool:
        return os.path.exists(self.path)


_parent: WarmParent | SharedParent | None = None
_parent_lock = threading.Lock()
_enabled = False


def enable() -> None:
    """Fork runs from a warm parent from now on (the test session; the benchmarks time cold starts)."""
    global _enabled
    _enabled = True


def share() -> None:
    """Start the session's parent now, in this process (pytest-xdist's controller), for every process
    it starts: the workers, and what they start, find it through ``SOCKET_VARIABLE``."""
    from tests.support.env import child_env

    global _parent
    _parent = WarmParent(child_env(), wait=False)  # the workers start meanwhile; they wait for its socket
    os.environ[SOCKET_VARIABLE] = _parent.path


def _wanted() -> bool:
    return (_enabled or os.environ.get(WARM_VARIABLE) == "1") and os.environ.get("IMAGE_SEARCH_TESTS_COLD") != "1"


def warmable(env: dict[str, str], base: dict[str, str]) -> bool:
    """Whether a run with ``env`` may be forked from a parent started with ``base``."""
    differing = {key for key in env.keys() | base.keys() if env.get(key) != base.get(key)}
    if not all(key.startswith(_RUN_TIME_VARIABLES) for key in differing):
        return False
    # PYTHONPATH may only add folders of a sitecustomize (the faults): the run executes those itself.
    added = set(filter(None, env.get("PYTHONPATH", "").split(os.pathsep))) - set(
        filter(None, base.get("PYTHONPATH", "").split(os.pathsep)))
    return all(os.path.isfile(os.path.join(p, "sitecustomize.py")) for p in added)


def parent() -> WarmParent | SharedParent:
    """This process's warm parent: the session's shared one where there is one, else its own."""
    from tests.support.env import child_env

    global _parent
    with _parent_lock:
        if _parent is None or not _parent.alive:
            shared = os.environ.get(SOCKET_VARIABLE)
            owned = isinstance(_parent, WarmParent)  # this process started it (share): it is gone
            _parent = SharedParent(shared) if shared and not owned else WarmParent(child_env())
        return _parent


class WarmPopen(subprocess.Popen):
    """A ``subprocess.Popen`` whose child is forked by the warm parent instead of executed."""

    def __init__(self, args, *, warm: WarmParent | SharedParent, **kwargs) -> None:
        self._warm = warm
        self._conn: socket.socket | None = None
        super().__init__(args, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, gid, gids, uid, umask, start_new_session, *rest) -> None:
        fds: list[int] = []
        stdio: list[int | None] = []
        for fd in (p2cread, c2pwrite, errwrite):
            if fd == -1:
                stdio.append(None)
            else:
                stdio.append(len(fds))
                fds.append(fd)
        request = {"args": [os.fsdecode(a) for a in args], "cwd": os.fsdecode(cwd or os.getcwd()),
                   "env": dict(env if env is not None else os.environ), "new_session": bool(start_new_session),
                   "stdio": stdio}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self._warm.path)
            _send(conn, request, fds)
            reply, _ = _receive(conn)
        except BaseException:
            conn.close()
            raise
        finally:
            # As Popen does once the child has them: the child's ends are closed here.
            if p2cread != -1 and p2cwrite != -1 and p2cread != getattr(self, "_devnull", None):
                os.close(p2cread)
            if c2pwrite != -1 and c2pread != -1 and c2pwrite != getattr(self, "_devnull", None):
                os.close(c2pwrite)
            if errwrite != -1 and errread != -1 and errwrite != getattr(self, "_devnull", None):
                os.close(errwrite)
            if hasattr(self, "_devnull"):
                os.close(self._devnull)
        self._conn = conn
        self.pid = reply["pid"]
        self._child_created = True

    def _ended(self, timeout: float | None) -> bool:
        """Read how the child ended, waiting up to ``timeout`` seconds (None: for ever)."""
        if self.returncode is not None:
            return True
        readable, _, _ = select.select([self._conn], [], [], timeout)
        if not readable:
            return False
        try:
            reply, _ = _receive(self._conn)
            self.returncode = reply["returncode"]
        except (EOFError, OSError):
            self.returncode = -signal.SIGKILL  # the warm parent went away, and took its children with it
        self._conn.close()
        return True

    def _internal_poll(self, _deadstate=None, **_ignored):
        self._ended(0)
        return self.returncode

    def _wait(self, timeout):
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode


def popen(args: list, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)`` for an ``image-search`` run: forked from the warm parent when
    its environment allows (``warmable``), else started the usual way."""
    env = kwargs.get("env")
    if _wanted():
        warm = parent()
        if warmable(dict(env if env is not None else os.environ), warm.env):
            return WarmPopen(args, warm=warm, **kwargs)
    return subprocess.Popen(args, **kwargs)


def run(args: list, *, timeout: float | None = None, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` through ``popen``."""
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with popen(args, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


if __name__ == "__main__":
    _serve(sys.argv[1])
