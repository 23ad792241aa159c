"""Run model-written Python (HumanEval, ChatCORE, RL rewards) inside an OS-level sandbox.

The boundary is bubblewrap (`bwrap`, the namespace sandbox Flatpak uses), not Python: a guard
written in Python can be undone from Python by one deliberate line, a kernel namespace cannot.
docs/sandbox.md says what this guarantees and what it does not. In short, each call gets:

- new user, PID, network, mount, IPC, UTS and cgroup namespaces; uid/gid 65534 inside (and
  outside: as root, an outer bwrap builds the view, setpriv drops to 65534, and an inner bwrap
  adds the user namespace), no capabilities, no further user namespaces, a new session;
- a file system holding only /usr and the base interpreter's prefix (read-only; not the venv,
  the project or $HOME), a fresh /proc and a read-only minimal /dev, and a private tmpfs at
  /sandbox of `max_disk_bytes` as the one writable place (the total disk quota); no /etc (so
  no /etc/shadow), an environment of PATH, TMPDIR and HOME only; Python runs with -I -S
  (standard library only);
- no network at all (loopback only, in its own namespace, so 127.0.0.1 is not the host's);
- a pids and a memory limit on the whole tree: a cgroup where this machine lets us make one
  (v1 or v2), and always rlimits (NPROC, AS, DATA, CPU, FSIZE) set by prlimit after the uid
  change, where they bind (the kernel counts NPROC per user namespace and ignores it for root);
- `--die-with-parent`, and at the timeout (or right after a normal exit) the outer bwrap is
  killed, which takes the PID namespace and so every descendant with it; the cgroup, if any,
  is emptied too. Output is read in the calling thread (no reader threads to leak) until EOF
  or the deadline, and the pipes are closed only after the last read.

Inside, the Python-level guards of the earlier version stay as a second layer (blocked
process creation and sockets, destructive os functions set to None, writes outside the work
dir refused, rlimits AS/DATA/STACK/CPU/FSIZE/NPROC).

Where no usable bwrap exists, `execute_code` raises SandboxUnavailable unless unsafe execution
was asked for (`unsafe_exec=True`, or `set_unsafe_exec(True)`, which the `--unsafe-exec` flag of
train/chat_eval.py and train/rl.py calls); then the code runs with the Python-level guards, a
temporary work dir, `unshare -n` where allowed and a process-group kill, which stops honest
mistakes but not deliberate escapes, and the result says `sandboxed=False`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

MiB = 1024 * 1024
TIMEOUT_ERROR = "Execution timed out (process killed)"
SANDBOX_UID = 65534  # "nobody"
SANDBOX_WORK = "/sandbox"  # the private tmpfs, the work dir inside the sandbox
_DRAIN_AFTER_EXIT = 0.5  # seconds to keep reading pipes a finished child's leftovers may hold (unsafe mode)


class SandboxUnavailable(RuntimeError):
    """No usable OS sandbox here, and unsafe execution was not asked for."""


@dataclasses.dataclass
class ExecutionResult:
    success: bool  # exit status 0, no timeout
    stdout: str
    stderr: str
    error: str | None = None  # the last stderr line on failure, or what killed the process
    timeout: bool = False
    memory_exceeded: bool = False  # "MemoryError" in stderr, or the memory cgroup killed it
    sandboxed: bool = True  # False: ran with Python-level guards only (unsafe_exec)


# ----------------------------------------------------------------------------- the Python-level second layer

_GUARD = r'''
def _nanochat_guard(work, mem, cpu, fsize, nproc, block_processes):
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
    if nproc and hasattr(resource, "RLIMIT_NPROC"):
        limit(resource.RLIMIT_NPROC, nproc)

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


_nanochat_guard(__WORK__, __MEM__, __CPU__, __FSIZE__, __NPROC__, __BLOCK__)
del _nanochat_guard
'''

_RUN = 'exec(compile(__CODE__, "<llm>", "exec"), {"__name__": "__main__"})\n'


def _script(code: str, work: str, mem: int | None, cpu: int, fsize: int | None, nproc: int,
            block_processes: bool, guard: bool = True) -> str:
    values = {"__WORK__": work, "__MEM__": mem or 0, "__CPU__": cpu, "__FSIZE__": fsize or 0, "__NPROC__": nproc,
              "__BLOCK__": block_processes, "__CODE__": code}
    # one pass, so nothing inside a substituted value (the code) is ever substituted again
    return re.sub(r"__(WORK|MEM|CPU|FSIZE|NPROC|BLOCK|CODE)__", lambda m: repr(values[m.group(0)]),
                  (_GUARD if guard else "") + _RUN)


# ----------------------------------------------------------------------------- the OS sandbox


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """What a probe found usable on this machine (see sandbox_status)."""

    bwrap: str
    python: str  # the base interpreter (a venv's python is a link to it), run by its real path
    ro_binds: tuple[str, ...]  # visible read-only at the same path
    symlinks: tuple[tuple[str, str], ...]  # (target, link): /lib -> usr/lib on merged-/usr systems
    cgroups: tuple[tuple[str, str, str], ...]  # (controller, parent dir we may create children in, version)
    nested: bool  # root: outer bwrap builds the view, setpriv drops to 65534, inner bwrap adds the user namespace
    prlimit: str | None  # util-linux prlimit, which sets the rlimits before Python starts


def _base_interpreter() -> tuple[str, str]:
    """(real path of the base interpreter, real path of its prefix): a venv adds nothing the
    sandboxed code needs (it runs with the standard library only), so only these are bound."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return python, os.path.realpath(sys.base_prefix)


def _system_layout(prefix: str, python: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    binds, links = ["/usr"], []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            links.append((os.readlink(top), top))
        elif os.path.isdir(top):
            binds.append(top)
    for extra in (prefix, os.path.dirname(os.path.dirname(python))):
        if not any(extra == b or extra.startswith(b + "/") for b in binds):
            binds.append(extra)
    return tuple(binds), tuple(links)


def _own_cgroup_dirs() -> list[tuple[str, str, str]]:
    """(controller, directory of this process's cgroup for it, "1"/"2") for pids and memory."""
    if not os.path.isfile("/proc/self/cgroup") or not os.path.isfile("/proc/self/mountinfo"):
        return []
    v1_mounts, v2_mount = {}, None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = right.split()
        if len(fields) < 3:
            continue
        fstype, options, mount_point = fields[0], fields[2], left.split()[4]
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount = mount_point
        elif fstype == "cgroup":
            for opt in options.split(","):
                if opt in ("pids", "memory"):
                    v1_mounts[opt] = mount_point
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hier, controllers, path = line.split(":", 2)
        if hier == "0" and v2_mount:
            available = Path(v2_mount, path.lstrip("/"), "cgroup.subtree_control")
            for c in ("pids", "memory"):
                if available.is_file() and c in available.read_text().split() and c not in v1_mounts:
                    found.append((c, os.path.join(v2_mount, path.lstrip("/")), "2"))
        else:
            for c in controllers.split(","):
                if c in v1_mounts:
                    found.append((c, os.path.join(v1_mounts[c], path.lstrip("/")), "1"))
    return found


def _remove_stale_cgroups(parent: str, older_than_s: float = 3600.0) -> None:
    """Empty per-execution cgroups an evaluator killed mid-run left behind (rmdir refuses busy ones)."""
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith("nanochat-exec-") and e.is_dir()]
    except OSError:
        return
    for entry in entries:
        try:
            if time.time() - entry.stat().st_mtime > older_than_s:
                os.rmdir(entry.path)
        except OSError:
            pass


def _usable_cgroups() -> tuple[tuple[str, str, str], ...]:
    """The controllers whose limits we can set on a child cgroup of our own (probed once)."""
    usable = []
    for controller, parent, version in _own_cgroup_dirs():
        _remove_stale_cgroups(parent)
        probe = os.path.join(parent, f"nanochat-probe-{uuid.uuid4().hex[:12]}")
        limit_file = {"pids": "pids.max", "memory": "memory.max" if version == "2" else "memory.limit_in_bytes"}
        try:
            os.mkdir(probe)
        except OSError:
            continue
        try:
            Path(probe, limit_file[controller]).write_text("64" if controller == "pids" else str(64 * MiB))
            usable.append((controller, parent, version))
        except OSError:
            pass
        finally:
            try:
                os.rmdir(probe)
            except OSError:
                pass
    return tuple(usable)


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _sandbox_argv(sb: Sandbox, disk_bytes: int, rlimits: dict[str, int]) -> list[str]:
    """The command line that starts a program in the sandbox (append the program's argv)."""
    ns = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup"]
    user = ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    env = ["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "TMPDIR", SANDBOX_WORK,
           "--setenv", "HOME", SANDBOX_WORK, "--setenv", "MALLOC_ARENA_MAX", "1"]
    view = []
    for path in sb.ro_binds:  # parents a privileged bwrap would create 0700, which uid 65534 could not cross
        for parent in _ancestors(path):
            if not any(parent == b or parent.startswith(b + "/") for b in sb.ro_binds):
                view += ["--perms", "0755", "--dir", parent]
        view += ["--ro-bind", path, path]
    for target, link in sb.symlinks:
        view += ["--symlink", target, link]
    view += ["--proc", "/proc", "--dev", "/dev", "--dir", "/tmp", "--size", str(disk_bytes), "--perms", "01777",
             "--tmpfs", SANDBOX_WORK, "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", SANDBOX_WORK]
    common = ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
    limits = [sb.prlimit, *(f"--{k}={v}" for k, v in rlimits.items()), "--"] if sb.prlimit else []
    if not sb.nested:
        return [sb.bwrap, *ns, *user, *common, "--cap-drop", "ALL", *env, *view, "--", *limits]
    # run as root: a user namespace made by root maps 65534 to root outside, where RLIMIT_NPROC does not
    # bind; so root builds the view without one, and the uid drop comes first, then the user namespace
    outer = [sb.bwrap, *ns, *common, "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", *env, *view, "--"]
    drop = ["/usr/bin/setpriv", "--reuid", str(SANDBOX_UID), "--regid", str(SANDBOX_UID), "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--"]
    inner = [sb.bwrap, *user, "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--bind", "/", "/",
             "--chdir", SANDBOX_WORK, "--"]
    return [*outer, *drop, *inner, *limits]


_PROBE_CODE = ("import os; m = open('/proc/self/uid_map').read().split(); "
               "import resource; print(os.getuid(), m[1], resource.getrlimit(resource.RLIMIT_NPROC)[0])")


def _probe(sb: Sandbox) -> str | None:
    """None if `sb` runs Python as uid 65534 with its rlimits; else what went wrong."""
    argv = [*_sandbox_argv(sb, 1 * MiB, {"nproc": 7} if sb.prlimit else {}), sb.python, "-I", "-S", "-c", _PROBE_CODE]
    try:
        probe = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"bwrap could not start: {e}"
    got = probe.stdout.split()
    if probe.returncode != 0 or len(got) != 3 or got[0] != str(SANDBOX_UID) or (sb.prlimit and got[2] != "7"):
        return (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}, output {probe.stdout!r}"])[-1]
    return None


@functools.lru_cache(maxsize=1)
def sandbox_status() -> tuple[Sandbox | None, str]:
    """(Sandbox, description) where bubblewrap works here, else (None, why not). Probed once."""
    if not sys.platform.startswith("linux"):
        return None, f"bubblewrap needs Linux (this is {sys.platform})"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bwrap (Debian/Ubuntu package `bubblewrap`) is not installed"
    try:
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout.split()[-1]
        if tuple(int(x) for x in version.split(".")[:2]) < (0, 8):
            return None, f"bubblewrap {version} is too old (0.8 or newer has --disable-userns and --size)"
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        pass  # no parsable version: the probe below decides
    python, prefix = _base_interpreter()
    binds, links = _system_layout(prefix, python)
    prlimit = shutil.which("prlimit", path="/usr/bin:/bin")
    sb = Sandbox(os.path.realpath(bwrap), python, binds, links, _usable_cgroups(), False, prlimit)
    notes = []
    if prlimit is None:
        notes.append("no prlimit: rlimits from the Python layer only")
    if os.geteuid() == 0:
        nested = dataclasses.replace(sb, nested=True)
        why = _probe(nested) if os.path.isfile("/usr/bin/setpriv") and bwrap.startswith("/usr/") else "no setpriv"
        if why is None:
            sb = nested
        else:
            notes.append(f"uid 65534 inside is root outside, RLIMIT_NPROC does not bind ({why})")
    if not sb.nested:
        why = _probe(sb)
        if why is not None:
            return None, f"bwrap is installed but does not work here: {why}"
    if sb.cgroups:  # a full run through the cgroup(s): entering one can fail where creating it worked
        try:
            r = _execute_sandboxed(sb, "print('ok')", 30.0, 256 * MiB, 4096, None, 4 * MiB, 8, True, True)
            error = None if r.stdout == "ok\n" else r.error
        except SandboxUnavailable as e:
            error = str(e)
        if error is not None:
            notes.append(f"cgroups unusable: {error}")
            sb = dataclasses.replace(sb, cgroups=())
    limits = ", ".join(f"{c} cgroup v{v}" for c, _, v in sb.cgroups) or "no writable cgroup: rlimits only"
    who = "root -> setpriv 65534 -> user namespace" if sb.nested else "user namespace, uid 65534"
    return sb, f"bubblewrap ({sb.bwrap}; {who}; {limits}{''.join('; ' + n for n in notes)})"


def _refusal(why: str) -> SandboxUnavailable:
    return SandboxUnavailable(f"refusing to run model-written code: no usable sandbox ({why}); install "
                              "bubblewrap, or pass --unsafe-exec to run it with Python-level guards only")


_unsafe_default = False


def set_unsafe_exec(enabled: bool) -> None:
    """Process-wide default for `execute_code(unsafe_exec=None)`; the --unsafe-exec flag sets it."""
    global _unsafe_default
    _unsafe_default = bool(enabled)


def code_execution_mode(unsafe_exec: bool | None = None) -> str:
    """One line saying how model-written code will run; raises SandboxUnavailable if it would be refused.
    Entry points print it before spending time on generation."""
    sb, why = sandbox_status()
    if sb is not None:
        return f"code execution: sandboxed by {why}"
    if not (_unsafe_default if unsafe_exec is None else unsafe_exec):
        raise _refusal(why)
    return (f"WARNING: code execution is NOT sandboxed ({why}); --unsafe-exec: Python-level guards only, "
            "which deliberate code can undo")


class _Cgroup:
    """One child cgroup per controller for one execution: limits set, then emptied and removed."""

    def __init__(self, sb: Sandbox, pids: int, memory: int | None):
        self.dirs = []
        name = f"nanochat-exec-{uuid.uuid4().hex}"
        for controller, parent, version in sb.cgroups:
            if controller == "memory" and memory is None:
                continue
            path = os.path.join(parent, name)
            try:
                os.mkdir(path)
                self.dirs.append((controller, path, version))
                if controller == "pids":
                    Path(path, "pids.max").write_text(str(pids))
                elif version == "2":
                    Path(path, "memory.max").write_text(str(memory))
                    _try_write(Path(path, "memory.swap.max"), "0")
                else:
                    Path(path, "memory.limit_in_bytes").write_text(str(memory))
                    _try_write(Path(path, "memory.memsw.limit_in_bytes"), str(memory))
            except OSError as e:
                self.remove()
                raise SandboxUnavailable(f"could not set up the {controller} cgroup {path}: {e}") from None

    def procs_files(self) -> list[str]:
        return [os.path.join(path, "cgroup.procs") for _, path, _ in self.dirs]

    def oom_killed(self) -> bool:
        for controller, path, version in self.dirs:
            if controller != "memory":
                continue
            name = "memory.events" if version == "2" else "memory.oom_control"
            try:
                for line in Path(path, name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
            except (OSError, ValueError):
                pass
        return False

    def kill_all(self) -> None:
        for _, path, version in self.dirs:
            if version == "2" and _try_write(Path(path, "cgroup.kill"), "1"):
                continue
            for _ in range(100):  # v1: kill what is listed until nothing is (a fork in between is caught next round)
                try:
                    pids = [int(p) for p in Path(path, "cgroup.procs").read_text().split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.002)

    def remove(self) -> None:
        for _, path, _ in self.dirs:
            for _ in range(500):  # a killed task leaves its cgroup a moment after SIGKILL
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        self.dirs = []


def _try_write(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- the unsafe fallback


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """The `unshare` command that puts a child in a new, empty network namespace, or () where none
    works (used only by the unsafe fallback; the sandbox has its own network namespace)."""
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


_warned_unsafe = False


def _warn_unsafe(why: str) -> None:
    global _warned_unsafe
    if not _warned_unsafe:
        _warned_unsafe = True
        print(f"WARNING: running model-written code WITHOUT an OS sandbox ({why}); --unsafe-exec was given",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- running


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[list, bool]:
    """Read stdout and stderr in this thread until both reach EOF and the child has exited, or
    the deadline passes. Returns ([(kept bytes, total bytes)] * 2, timed_out). Nothing reads a
    descriptor after this returns, so no later execution can lose output to a stale reader."""
    outs = [[bytearray(), 0], [bytearray(), 0]]
    sel = selectors.DefaultSelector()
    for i, stream in enumerate((proc.stdout, proc.stderr)):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream.fileno(), selectors.EVENT_READ, i)
    exited_at = None
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and (not sel.get_map() or now - exited_at > _DRAIN_AFTER_EXIT):
                return outs, False
            if now >= deadline:
                return outs, proc.poll() is None
            if not sel.get_map():  # both closed, child still running: wait for it, not for output
                try:
                    proc.wait(max(0.0, deadline - now))
                except subprocess.TimeoutExpired:
                    pass
                continue
            wait = deadline - now if exited_at is None else _DRAIN_AFTER_EXIT
            for key, _ in sel.select(min(wait, 0.05)):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = outs[key.data]
                buf[1] += len(chunk)
                if len(buf[0]) < cap:
                    buf[0] += chunk[: cap - len(buf[0])]
    finally:
        sel.close()


def _text(data: bytearray, seen: int, what: str) -> str:
    text = bytes(data).decode("utf-8", errors="replace")
    if seen > len(data):
        text += f"\n[{what} truncated: {seen - len(data):,} more bytes dropped]"
    return text


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute_code(
    code: str,
    timeout: float = 5.0,
    maximum_memory_bytes: int | None = 256 * MiB,
    *,
    max_output_bytes: int = 1 * MiB,
    max_file_bytes: int | None = 16 * MiB,
    max_disk_bytes: int = 64 * MiB,
    max_processes: int = 64,
    isolate_network: bool = True,
    unsafe_exec: bool | None = None,
    _block_processes: bool = True,
    _python_guard: bool = True,
) -> ExecutionResult:
    """Run `code` in a fresh sandboxed Python (see the module docstring) and report how it went.

    maximum_memory_bytes bounds each process (rlimit AS) and, plus the disk quota, the whole tree
    (cgroup); None lifts both. max_disk_bytes is the size of the only writable place, max_processes
    the number of tasks the code may have at once (threads count too: ThreadPoolExecutor starts up
    to 32). isolate_network applies to the unsafe fallback (the sandbox always has its own network
    namespace). unsafe_exec=None uses set_unsafe_exec's default; without a usable sandbox and
    without unsafe_exec this raises SandboxUnavailable.
    `_block_processes=False` / `_python_guard=False` (tests only) switch off parts of the Python
    layer, to show what the OS layer holds by itself."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if max_processes < 1 or max_disk_bytes < MiB:
        raise ValueError(f"max_processes must be >= 1 and max_disk_bytes >= 1 MiB, got {max_processes}, {max_disk_bytes}")
    sb, why = sandbox_status()
    if sb is None:
        if not (_unsafe_default if unsafe_exec is None else unsafe_exec):
            raise _refusal(why)
        _warn_unsafe(why)
        return _execute_unsafe(code, timeout, maximum_memory_bytes, max_output_bytes, max_file_bytes,
                               isolate_network, _block_processes, _python_guard)
    return _execute_sandboxed(sb, code, timeout, maximum_memory_bytes, max_output_bytes, max_file_bytes,
                              max_disk_bytes, max_processes, _block_processes, _python_guard)


def _execute_sandboxed(sb, code, timeout, mem, max_output, fsize, disk, nproc, block, guard) -> ExecutionResult:
    cpu = int(timeout) + 1  # a backstop: the wall-clock kill below comes first
    script = _script(code, SANDBOX_WORK, mem, cpu, fsize, nproc, block, guard)
    rlimits = {"nproc": nproc, "cpu": cpu, "core": 0}
    if mem:  # (not STACK: set before start, glibc would make it every thread's stack size; the guard sets it)
        rlimits.update({"as": mem, "data": mem})
    if fsize:
        rlimits["fsize"] = fsize
    # the cgroup also holds the launcher/bwrap processes (3 when nested, 2 otherwise)
    tree_memory = None if mem is None else mem + disk + 64 * MiB
    cgroup = _Cgroup(sb, nproc + 3, tree_memory)
    argv = [*_sandbox_argv(sb, disk, rlimits), sb.python, "-I", "-S", "-u", "-c", script]
    if cgroup.dirs:  # move the launcher into the cgroup(s) before bwrap exists, so nothing starts outside
        argv = ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"',
                "sh", *cgroup.procs_files(), "--", *argv]
    try:
        proc = subprocess.Popen(argv, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True, cwd="/")
        try:
            outs, timed_out = _collect(proc, time.monotonic() + timeout, max_output)
        finally:
            proc.kill()  # the outer bwrap: its PID namespace, and all in it, goes with it
            returncode = proc.wait()
            cgroup.kill_all()
            proc.stdout.close()
            proc.stderr.close()
        oom = cgroup.oom_killed()
    finally:
        cgroup.remove()
    # bwrap reports a child killed by signal N as exit status 128 + N
    signum = returncode - 128 if returncode > 128 else (-returncode if returncode < 0 else 0)
    return _result(outs, timed_out, returncode, signum, oom, sandboxed=True)


def _execute_unsafe(code, timeout, mem, max_output, fsize, isolate_network, block, guard) -> ExecutionResult:
    work = os.path.realpath(tempfile.mkdtemp(prefix="nanochat-exec-"))
    nproc = 0
    if os.geteuid() != 0:  # NPROC counts all of this user's tasks outside a user namespace (root: ignored)
        nproc = _user_tasks() + 32
    try:
        script = _script(code, work, mem, int(timeout) + 1, fsize, nproc, block, guard)
        cmd = [sys.executable, "-I", "-u", "-c", script]
        if isolate_network:
            cmd = [*network_namespace_prefix(), *cmd]
        proc = subprocess.Popen(cmd, cwd=work, env={"PATH": "/usr/bin:/bin", "TMPDIR": work, "MALLOC_ARENA_MAX": "1"}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        try:
            outs, timed_out = _collect(proc, time.monotonic() + timeout, max_output)
        finally:
            _kill_group(proc.pid)  # the timed-out child, or what a finished one left in its group
            returncode = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _result(outs, timed_out, returncode, -returncode if returncode < 0 else 0, False, sandboxed=False)


def _user_tasks() -> int:
    uid, tasks = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat("/proc/" + pid).st_uid == uid:
                    tasks += len(os.listdir("/proc/" + pid + "/task"))
            except OSError:
                pass
    return tasks


def _result(outs, timed_out: bool, returncode: int, signum: int, oom: bool, sandboxed: bool) -> ExecutionResult:
    stdout = _text(outs[0][0], outs[0][1], "stdout")
    stderr = _text(outs[1][0], outs[1][1], "stderr")
    memory_exceeded = oom or "MemoryError" in stderr
    if timed_out:
        return ExecutionResult(False, stdout, stderr, TIMEOUT_ERROR, True, memory_exceeded, sandboxed)
    if returncode == 0:
        return ExecutionResult(True, stdout, stderr, None, False, memory_exceeded, sandboxed)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines:
        error = lines[-1]
    elif signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        error = f"killed by {name}" + (" (CPU time limit)" if name == "SIGXCPU" else "")
        if oom:
            error += " (memory limit of the sandbox)"
    else:
        error = f"exit status {returncode}"
    return ExecutionResult(False, stdout, stderr, error, False, memory_exceeded, sandboxed)
