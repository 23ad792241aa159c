"""Run model-written Python in a throwaway subprocess (spec §8.5), for HumanEval and the like.

NOT A SECURITY BOUNDARY. This keeps honest mistakes of a model (infinite loops, memory
blow-ups, deleting files, forking in a loop, printing forever, reaching for the network)
from hurting the host or the eval. Code written to escape can: it runs as the same user,
with the same file system, and a Python-level guard can be undone from Python. Run untrusted
code in a container or VM.

What `execute_code` does:
- a fresh `python -I -u -c` (sys.executable, isolated mode: no PYTHON* variables, no user
  site, no cwd on sys.path), in a new session / process group, in a new temporary working
  directory that is deleted afterwards; env is PATH=/usr/bin:/bin (plus TMPDIR = that
  directory); stdin is /dev/null;
- where `unshare -n` works (Linux, root or unprivileged user namespaces; checked once), in a
  new network namespace with no interfaces but loopback, so the network is really gone;
- a guard prelude, before the user code:
  * rlimits (hard = soft, so the code cannot raise them): AS, DATA, STACK = the memory limit
    (not on macOS); CPU = timeout + 1 s (a backstop if this process dies); FSIZE (largest file
    it may write); NPROC = its user's current tasks + 32 when not root (the kernel ignores
    NPROC for root, so there the guard below is what stops a fork bomb);
  * faulthandler off; exit, quit, help = None; OMP/OPENBLAS/MKL threads = 1;
  * destructive and process-creating functions of os/posix set to None (upstream's list:
    kill, system, putenv, remove, removedirs, rmdir, fchdir, setuid, fork, forkpty, killpg,
    rename, renames, truncate, replace, unlink, fchmod, fchown, chmod, chown, chroot, lchflags,
    lchmod, lchown, chdir; and also the exec*, spawn*, posix_spawn*, popen, link, setsid,
    setpgid, setpgrp); shutil.rmtree/move/chown and subprocess.Popen set to None,
    _posixsubprocess.fork_exec too. Deliberate difference: upstream also sets getcwd to None,
    which breaks os.path.abspath and pathlib's resolve(); here it returns the working directory;
  * writes outside the working directory refused (PermissionError): open / io.open / os.open
    in a writing mode, mkdir, symlink, mkfifo, mknod on a path that resolves outside it;
  * new sockets refused (socket.socket, _socket.socket, create_connection, create_server,
    fromfd → PermissionError; socket.socketpair still works, asyncio needs it);
  * modules ipdb, joblib, resource, psutil, tkinter (upstream's list) and ctypes blocked;
- the code runs as `exec(compile(code, "<llm>", "exec"), {"__name__": "__main__"})`;
- on timeout the whole process group is SIGKILLed (so are leftovers after a normal exit);
  stdout and stderr are captured up to `max_output_bytes` each (the rest is read and dropped).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

MiB = 1024 * 1024
TIMEOUT_ERROR = "Execution timed out (process killed)"


@dataclass
class ExecutionResult:
    success: bool  # exit status 0, no timeout
    stdout: str
    stderr: str
    error: str | None = None  # the last stderr line on failure, or what killed the process
    timeout: bool = False
    memory_exceeded: bool = False  # "MemoryError" in stderr


_GUARD = r'''
def _nanochat_guard(work, mem, cpu, fsize, block_processes):
    import builtins, faulthandler, io, os, posix, resource, shutil, socket, subprocess, sys
    import _io, _posixsubprocess, _socket

    def limit(res, value):
        soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))

    if mem and sys.platform != "darwin":
        for res in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK):
            limit(res, mem)
    limit(resource.RLIMIT_CPU, cpu)
    if fsize:
        limit(resource.RLIMIT_FSIZE, fsize)
    if os.geteuid() != 0 and hasattr(resource, "RLIMIT_NPROC"):
        uid, tasks = os.getuid(), 0
        try:
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        if os.stat("/proc/" + pid).st_uid == uid:
                            tasks += len(os.listdir("/proc/" + pid + "/task"))
                    except OSError:
                        pass
            limit(resource.RLIMIT_NPROC, tasks + 32)
        except OSError:
            pass

    faulthandler.disable()
    # (numpy calls os.putenv for the *_MAIN_FREE variables at import unless they are set)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_MAIN_FREE", "GOTOBLAS_MAIN_FREE"):
        os.environ[var] = "1"

    sep = os.sep
    realpath, isabs, join, fspath, fsdecode = os.path.realpath, os.path.isabs, os.path.join, os.fspath, os.fsdecode

    def inside(path, dir_fd=None):
        if isinstance(path, int):
            return True  # an already open file descriptor
        if dir_fd is not None:
            return False
        p = fspath(path)
        if isinstance(p, bytes):
            p = fsdecode(p)
        p = realpath(p if isabs(p) else join(work, p))
        return p == work or p.startswith(work + sep)

    def refuse(path):
        raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path!r}")

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and not inside(path, dir_fd):
            refuse(path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = _io.open = guarded_open
    os.open = posix.open = guarded_os_open

    def guard_path_call(name, arg):  # os.mkdir(path, ...), os.symlink(src, dst, ...): check one argument
        real = getattr(os, name, None)
        if real is None:
            return
        def guarded(*args, dir_fd=None, **kwargs):
            target = args[arg] if len(args) > arg else kwargs.get(("path", "dst")[arg])
            if not inside(target, dir_fd):
                refuse(target)
            if dir_fd is not None:
                kwargs["dir_fd"] = dir_fd
            return real(*args, **kwargs)
        setattr(os, name, guarded)
        setattr(posix, name, guarded)

    for name, arg in (("mkdir", 0), ("mkfifo", 0), ("mknod", 0), ("symlink", 1)):
        guard_path_call(name, arg)

    disabled = [
        "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
        "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
        "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "link",
    ]
    if block_processes:
        disabled += [
            "fork", "forkpty", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "popen",
            "posix_spawn", "posix_spawnp", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
            "spawnvp", "spawnvpe", "setsid", "setpgid", "setpgrp",
        ]
    for name in disabled:
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, None)
    # Upstream sets getcwd to None too; chdir is gone, so the answer is always `work`, and
    # answering it keeps os.path.abspath and pathlib's resolve() working.
    os.getcwd = posix.getcwd = lambda: work
    os.getcwdb = posix.getcwdb = lambda: os.fsencode(work)
    shutil.rmtree = shutil.move = shutil.chown = None
    if block_processes:
        subprocess.Popen = None
        _posixsubprocess.fork_exec = None

    def no_network(*args, **kwargs):
        raise PermissionError("sandbox: network access is disabled")

    # subclasses, not functions, so that modules subclassing socket.socket (ssl) still import;
    # wrapping an existing descriptor stays allowed (socket.socketpair, which asyncio needs)
    class NoSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:
                no_network()
            super().__init__(family, type, proto, fileno)

    raw_socket = _socket.socket

    class NoRawSocket(raw_socket):  # socket.socket.__init__ calls _socket.socket.__init__ by name
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:
                no_network()
            raw_socket.__init__(self, family, type, proto, fileno)

    socket.socket = socket.SocketType = NoSocket
    _socket.socket = _socket.SocketType = NoRawSocket
    for name in ("create_connection", "create_server", "fromfd"):
        if hasattr(socket, name):
            setattr(socket, name, no_network)

    blocked = ["ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes"]
    if block_processes:
        blocked += ["_posixsubprocess"]
    for name in blocked:
        sys.modules[name] = None
    builtins.exit = builtins.quit = builtins.help = None


_nanochat_guard(__WORK__, __MEM__, __CPU__, __FSIZE__, __BLOCK__)
del _nanochat_guard
exec(compile(__CODE__, "<llm>", "exec"), {"__name__": "__main__"})
'''


def _script(code: str, work: str, mem: int | None, cpu: int, fsize: int | None, block_processes: bool) -> str:
    values = {"__WORK__": work, "__MEM__": mem or 0, "__CPU__": cpu, "__FSIZE__": fsize or 0,
              "__BLOCK__": block_processes, "__CODE__": code}
    # one pass, so nothing inside a substituted value (the code) is ever substituted again
    return re.sub(r"__(WORK|MEM|CPU|FSIZE|BLOCK|CODE)__", lambda m: repr(values[m.group(0)]), _GUARD)


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """The `unshare` command that puts a child in a new, empty network namespace, or () where none works."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return ()
    for flags in (("-n",), ("-r", "-n")):
        cmd = (unshare, *flags, "--")
        try:
            probe = subprocess.run([*cmd, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return cmd
    return ()


def _reader(fd: int, cap: int, out: bytearray, seen: list) -> None:
    """Read fd to EOF; keep the first `cap` bytes, count all of them."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen[0] += len(chunk)
        if len(out) < cap:
            out += chunk[: cap - len(out)]


def _wait_unreaped(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until the child exits or the deadline passes, WITHOUT reaping it, so its pid and
    process group stay reserved for the killpg that follows. True if it exited."""
    if not hasattr(os, "waitid") or not hasattr(os, "WNOWAIT"):  # pragma: no cover - non-Linux fallback
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False
    delay = 0.0005
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _text(data: bytearray, seen: int, what: str) -> str:
    text = bytes(data).decode("utf-8", errors="replace")
    if seen > len(data):
        text += f"\n[{what} truncated: {seen - len(data):,} more bytes dropped]"
    return text


def execute_code(
    code: str,
    timeout: float = 5.0,
    maximum_memory_bytes: int | None = 256 * MiB,
    *,
    max_output_bytes: int = 1 * MiB,
    max_file_bytes: int | None = 16 * MiB,
    isolate_network: bool = True,
    _block_processes: bool = True,
) -> ExecutionResult:
    """Run `code` in a fresh, guarded Python subprocess (see the module docstring; not a security
    boundary) and report how it went. `maximum_memory_bytes=None` lifts the memory rlimits;
    `_block_processes=False` (tests only) leaves fork/exec/subprocess available."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    work = os.path.realpath(tempfile.mkdtemp(prefix="nanochat-exec-"))
    try:
        script = _script(code, work, maximum_memory_bytes, int(timeout) + 1, max_file_bytes, _block_processes)
        cmd = [sys.executable, "-I", "-u", "-c", script]
        if isolate_network:
            cmd = [*network_namespace_prefix(), *cmd]
        proc = subprocess.Popen(
            cmd, cwd=work, env={"PATH": "/usr/bin:/bin", "TMPDIR": work}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
        )
        outs = [(bytearray(), [0]), (bytearray(), [0])]
        readers = [
            threading.Thread(target=_reader, args=(stream.fileno(), max_output_bytes, buf, seen), daemon=True)
            for stream, (buf, seen) in zip((proc.stdout, proc.stderr), outs)
        ]
        for t in readers:
            t.start()
        try:
            timed_out = not _wait_unreaped(proc, time.monotonic() + timeout)
        finally:
            _kill_group(proc.pid)  # the timed-out child, or anything a finished one left behind
            returncode = proc.wait()
        for t in readers:
            t.join(timeout=5)
        proc.stdout.close()
        proc.stderr.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    stdout = _text(outs[0][0], outs[0][1][0], "stdout")
    stderr = _text(outs[1][0], outs[1][1][0], "stderr")
    memory_exceeded = "MemoryError" in stderr
    if timed_out:
        return ExecutionResult(False, stdout, stderr, TIMEOUT_ERROR, timeout=True, memory_exceeded=memory_exceeded)
    if returncode == 0:
        return ExecutionResult(True, stdout, stderr, None, memory_exceeded=memory_exceeded)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines:
        error = lines[-1]
    elif returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        error = f"killed by {name}" + (" (CPU time limit)" if name == "SIGXCPU" else "")
    else:
        error = f"exit status {returncode}"
    return ExecutionResult(False, stdout, stderr, error, memory_exceeded=memory_exceeded)
