"""Worker processes forked from a template that has already imported what a worker needs.

A worker started as a fresh interpreter spends about 0.3 s of CPU importing numpy, Pillow, pillow-heif,
structlog and the preprocessing code before it reads its first file; a service with sixteen workers paid
that sixteen times at each start, a spare worker (workers.py) made the files it was started for wait that
long, and the test suite, which starts a pool in most of its tests, spent about a third of its CPU on it
(236 of some 700 CPU-seconds, measured on 2 cores). So a process starts one template the first time it
starts a worker: a bare interpreter (never the parent's ``__main__``, never torch: see workers.py) that
imports the worker's module once, then forks a worker for each request, in a few milliseconds.

The template is that process's, shared by all its pools, as multiprocessing's forkserver is: one for the
environment it was started in (a worker must see the variables, ``sys.path`` and interpreter a fresh one
would have); where those differ when a worker is asked for, a new template is started and the old one
left to end once its workers have. What a fresh worker would take from its parent at its own start and
not from the template's is sent with each request: the umask, its standard error (pytest gives each test
its own), and the working directory as an O_PATH descriptor (it may have been deleted, or be one that may
be entered but not listed).

The template reaps its workers and writes each one's exit status into a pipe of that worker's
(``ForkedProcess.wait``). With each worker's pid it sends a pidfd of it, opened before it could be reaped:
``ForkedProcess.kill`` signals that process and no other, even once its number names another one. It
ignores SIGINT and SIGTERM as the workers do, and ends once the process that started it closes its end
(exits, dies or starts another template) and its last worker has ended.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

# The environment variable pytest rewrites before each test: no difference a worker could see.
_VOLATILE = ("PYTEST_CURRENT_TEST",)
# A request's answer: the worker's pid (with a pidfd of it where the kernel has them, Linux 5.3 and later), or
# minus the errno of a fork the system refused.
_PID = struct.Struct("!q")
# A worker's exit status, as subprocess gives it (-N: killed by signal N).
_STATUS = struct.Struct("!i")
_MAX_REQUEST = 1 << 16
# How long a request may wait for the template's answer: its first includes its imports (0.3 s idle, a few
# seconds on a loaded machine); past this it is taken for stuck, killed and replaced once.
ANSWER_TIMEOUT_S = 20.0

# Signals are ignored before anything else, so that a Ctrl-C while the template is still importing costs
# nothing; its workers inherit that. Run with -P: ``python -c`` would put the working directory first on
# sys.path, and a json.py or signal.py there (a project folder the command was run in) would be imported.
_TEMPLATE_BOOTSTRAP = (
    "import signal\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "import json, sys\n"
    "sys.path[:] = json.loads(sys.argv[2])\n"
    "from image_search.launcher import _template_main\n"
    "_template_main(int(sys.argv[1]))\n"
)


class TemplateGone(OSError):
    """The template process ended before it answered (it could not start, or was killed)."""


class ForkedProcess:
    """A worker forked by a template, as its pool sees it: what it uses of ``subprocess.Popen``."""

    def __init__(self, pid: int, status_fd: int, pidfd: int | None = None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._status_fd = status_fd  # the template writes the exit status here once it has reaped the worker
        self._pidfd = pidfd  # this process's, whatever its pid names later; None on kernels without pidfds
        self._ended = False

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit status once it has ended; raises ``subprocess.TimeoutExpired`` if it has not within
        ``timeout``. None when it ended without one: the template that could have said is gone."""
        if not self._ended:
            self._wait_readable(self._status_fd, timeout)
            data = os.read(self._status_fd, _STATUS.size)
            if len(data) < _STATUS.size:  # the template ended first: the worker went with its connection
                self._wait_gone(timeout)
            else:
                (self.returncode,) = _STATUS.unpack(data)
            self._ended = True
            self._close()
        return self.returncode

    def _wait_gone(self, timeout: float | None) -> None:
        if self._pidfd is not None:  # readable once the process has ended, whoever its parent is now
            self._wait_readable(self._pidfd, timeout)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while _running(self.pid):
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"preprocessing worker {self.pid}", timeout or 0.0)
            time.sleep(0.05)

    def _wait_readable(self, fd: int, timeout: float | None) -> None:
        poller = select.poll()  # not select(): a descriptor may be numbered above 1023
        poller.register(fd, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
            raise subprocess.TimeoutExpired(f"preprocessing worker {self.pid}", timeout or 0.0)

    def kill(self) -> None:
        try:
            self.wait(timeout=0)  # ended already: nothing to signal
        except subprocess.TimeoutExpired:
            try:
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                else:  # by number: the template may have reaped it since the check above, and its pid be reused
                    os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _close(self) -> None:
        for fd in (self._status_fd, self._pidfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __del__(self) -> None:
        if not self._ended:
            self._close()


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of process ``pid`` (R running, S asleep, D in uninterruptible I/O...);
    None where it cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0].decode("ascii")
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def how_it_ended(code: int) -> str:
    """A process's exit status in words, as ``subprocess`` gives it (-N: killed by signal N)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _running(pid: int) -> bool:
    """Process ``pid`` exists and has not ended (a zombie its new parent did not reap yet has)."""
    return process_state(pid) not in (None, "Z")


class _Template:
    """One template process (one request at a time: ``Launcher``'s lock)."""

    def __init__(self, sys_path_json: str, env: dict[str, str]) -> None:
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(ANSWER_TIMEOUT_S)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-c", _TEMPLATE_BOOTSTRAP, str(child.fileno()), sys_path_json],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                stderr=None if _stderr() else subprocess.DEVNULL,  # 0-2 open: no descriptor it is sent lands on 2
            )
        except BaseException:
            self._sock.close()
            raise
        finally:
            child.close()
        # False once a request was cut short between its send and its answer: an answer still on its way
        # would be read as the next request's (another worker's pid).
        self.usable = True

    def fork(self, conn_fd: int, log_level: int) -> ForkedProcess:
        """A worker on ``conn_fd`` (its end of the pool's connection, kept open here: the caller closes it)."""
        request = json.dumps({"log_level": log_level, "umask": _umask()}).encode()
        status_read, status_write = os.pipe()
        try:
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)  # a folder the user may enter but not list will do
        except BaseException:
            os.close(status_read)
            os.close(status_write)
            raise
        try:
            socket.send_fds(self._sock, [request], [conn_fd, status_write, cwd, *_stderr()])
            pid, pidfd = _receive_answer(self._sock)
        except BaseException as exc:  # a stop's exception in the caller's thread too
            os.close(status_read)
            self.usable = False
            if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                raise TemplateGone(f"the workers' template process {self._ending()}") from exc
            if isinstance(exc, TimeoutError):  # alive but stuck (stopped, or its import hangs): of no use
                self.process.kill()
                raise TemplateGone(f"the workers' template process did not answer within "
                                   f"{self._sock.gettimeout():g} s, so it was killed") from exc
            raise
        finally:
            os.close(status_write)
            os.close(cwd)
        if pid < 0:
            os.close(status_read)
            raise OSError(-pid, f"could not start a preprocessing worker: {os.strerror(-pid)}")
        return ForkedProcess(pid, status_read, pidfd)

    def _ending(self) -> str:
        try:
            code = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "closed its connection"
        return how_it_ended(code)

    def retire(self) -> None:
        """No more workers from it: it ends once those it has forked have."""
        self._sock.close()
        self.usable = False


def _receive_answer(sock: socket.socket) -> tuple[int, int | None]:
    """The template's answer to a request: the worker's pid (negative: minus an errno) and its pidfd, if sent."""
    data, fds = b"", []
    try:
        while len(data) < _PID.size:
            chunk, chunk_fds, _, _ = socket.recv_fds(sock, _PID.size - len(data), 1)
            fds += chunk_fds
            if not chunk:
                raise BrokenPipeError("the template closed its connection")
            data += chunk
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for extra in fds[1:]:
        os.close(extra)
    (pid,) = _PID.unpack(data)
    return pid, fds[0] if fds else None


def _stderr() -> list[int]:
    """This process's standard error, for the worker's (none where it is closed: the worker keeps the
    template's)."""
    try:
        os.fstat(2)
    except OSError:
        return []
    return [2]


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread, for a moment)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Launcher:
    """Starts workers through the template of this process's current environment (one at a time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._template: _Template | None = None
        self._key: tuple[Any, ...] | None = None
        self._retired: list[subprocess.Popen[bytes]] = []
        os.register_at_fork(after_in_child=self._forget_in_a_fork)

    def start(self, conn_fd: int, *, sys_path_json: str, env: dict[str, str], log_level: int) -> ForkedProcess:
        """A worker process running ``workers._worker_main`` on ``conn_fd``, with ``env`` and ``sys.path`` as a
        fresh interpreter started with them would have. Raises OSError where none can be started."""
        key = (sys.executable, sys_path_json, tuple(sorted((k, v) for k, v in env.items() if k not in _VOLATILE)))
        with self._lock:
            self._retired = [p for p in self._retired if p.poll() is None]
            try:
                return self._current(key, sys_path_json, env).fork(conn_fd, log_level)
            except TemplateGone:  # killed, say: a new one, once
                self._replace(None, None)
                return self._current(key, sys_path_json, env).fork(conn_fd, log_level)

    def _current(self, key: tuple[Any, ...], sys_path_json: str, env: dict[str, str]) -> _Template:
        if (self._template is None or not self._template.usable or self._key != key
                or self._template.process.poll() is not None):
            self._replace(_Template(sys_path_json, env), key)
        assert self._template is not None
        return self._template

    def _replace(self, template: _Template | None, key: tuple[Any, ...] | None) -> None:
        if self._template is not None:
            self._template.retire()
            self._retired.append(self._template.process)
        self._template, self._key = template, key

    def close(self) -> None:
        """At exit: no more workers; give the templates a moment to end (their workers are gone by now)."""
        with self._lock:
            self._replace(None, None)
            for process in self._retired:
                try:
                    process.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass  # a worker stuck in a read keeps it: it ends after that worker
            self._retired = []

    def _forget_in_a_fork(self) -> None:
        """In the child of a fork of this process: its templates are the parent's. The child's copy of a
        template's socket is closed (the parent's stays open) and its lock is new: another thread may
        have held it as the process forked."""
        self._lock = threading.Lock()
        if self._template is not None:
            self._template._sock.close()
        self._template, self._key, self._retired = None, None, []


# The process's one launcher, as multiprocessing keeps one forkserver: every pool of the process forks from
# the same template, so its imports are paid once per process, not once per pool.
LAUNCHER = Launcher()
atexit.register(LAUNCHER.close)


# -- the template process ---------------------------------------------------------------------------------

def _template_main(fd: int) -> None:
    """The template's whole life: import the worker's code, then fork a worker per request and report how
    each ended, until the starting process closes its end and the last worker has ended."""
    from . import workers  # what every worker needs, imported once, here

    control: socket.socket | None = socket.socket(fileno=fd)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select() through the wakeup fd
    status_fds: dict[int, int] = {}
    while control is not None or status_fds:
        watched = [wake_read] if control is None else [wake_read, control]
        ready, _, _ = select.select(watched, [], [])
        if wake_read in ready:
            while True:
                try:
                    if not os.read(wake_read, 512):
                        break
                except BlockingIOError:
                    break
        _reap(status_fds)
        if control is not None and control in ready:
            message, fds, _, _ = socket.recv_fds(control, _MAX_REQUEST, 4)
            if not message:
                control.close()
                control = None
                continue
            conn_fd, status_write, cwd, *stderr = fds
            request = json.loads(message)
            try:
                pid = os.fork()
            except OSError as exc:
                pid = -(exc.errno or 11)
            if pid == 0:
                _become_worker(workers, conn_fd, cwd, stderr[0] if stderr else None, request)
            for fd in (conn_fd, cwd, *stderr):
                os.close(fd)
            if pid > 0:
                status_fds[pid] = status_write
            else:
                os.close(status_write)
            _answer(control, pid)


def _answer(control: socket.socket, pid: int) -> None:
    """The worker's pid, with a pidfd of it: opened here before the worker can be reaped (only this loop
    reaps), it names that process for as long as it is open, whatever its number names later."""
    try:
        pidfd = os.pidfd_open(pid) if pid > 0 else None
    except OSError:  # a kernel before 5.3, or a sandbox that forbids it: the pid alone
        pidfd = None
    if pidfd is None:
        control.sendall(_PID.pack(pid))
        return
    try:
        answer = _PID.pack(pid)
        sent = socket.send_fds(control, [answer], [pidfd])
        control.sendall(answer[sent:])
    finally:
        os.close(pidfd)


def _reap(status_fds: dict[int, int]) -> None:
    while status_fds:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if (status_write := status_fds.pop(pid, None)) is not None:
            try:
                os.write(status_write, _STATUS.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass  # its pool is gone
            os.close(status_write)


def _become_worker(workers: Any, conn_fd: int, cwd: int, stderr: int | None, request: dict[str, Any]) -> None:
    """In the forked child: a worker as a fresh interpreter would be, then its exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.fchdir(cwd)
        os.umask(request["umask"])
        if stderr is not None:
            sys.stderr.flush()
            os.dup2(stderr, 2)
        # Only stdin, stdout, stderr and its connection: no other worker's connection, no status pipe.
        os.closerange(3, conn_fd)
        os.closerange(conn_fd + 1, 65536)
        workers._worker_main(conn_fd, log_level=request["log_level"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)
