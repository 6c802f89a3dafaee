"""Hostile programs through the code judge: each is contained, scores 0, and the test checks the side effect itself
from outside (the file is still there, no process with the program's marker is left, the listener saw no connection,
the caller is alive, the wall time stayed bounded). Run in the best isolation this machine gives and in the seccomp
fallback; as root also as an unprivileged user (user namespaces, and seccomp + Landlock)."""
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from r1_engine.engine.rewards.code import CodeJudge, CodeLimits, CodeTests, code_reward
from r1_engine.engine.sandbox import LAUNCHER, Limits, find_cxx, get_sandbox

LIMITS = CodeLimits(test_timeout_s=1.0, memory_mb=256, compile_timeout_s=3.0, compile_memory_mb=1024,
                    completion_timeout_s=8.0, output_bytes=1 << 16, processes=24, file_size_mb=8)
BOUND_S = 12.0  # no hostile run may take longer (the budget is 8 s; the launcher and the pool add little)
HARNESS_MARK = b"R1END"  # in the cmdline of the harness and of every fork of it (python -c <harness>)
UNPRIVILEGED = 4242


def _judges():
    best = get_sandbox()
    if not best.contained:
        return {}
    judges = {best.isolation: CodeJudge(best, LIMITS, find_cxx())}
    fallback = get_sandbox(isolations=("seccomp",))
    if fallback.contained and "seccomp" not in judges:
        judges["seccomp"] = CodeJudge(fallback, LIMITS, find_cxx())
    return judges


JUDGES = _judges()
pytestmark = pytest.mark.skipif(not JUDGES, reason=f"no sandbox can contain a program here: {get_sandbox().detail}")


@pytest.fixture(params=sorted(JUDGES))
def judge(request):
    return JUDGES[request.param]


@pytest.fixture(scope="module")
def user_judges(tmp_path_factory):
    """As root: the launcher started as an unprivileged user (a wrapper drops to it), so the user-namespace path and
    the non-root seccomp + Landlock path run too."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not JUDGES:
        pytest.skip("needs root and setpriv to start the launcher as another user")
    wrapper = tmp_path_factory.mktemp("wrap") / "r1-sandbox-as-user"
    wrapper.write_text(f'#!/bin/sh\nchown {UNPRIVILEGED}:{UNPRIVILEGED} "$2"\n'
                       f'exec setpriv --reuid {UNPRIVILEGED} --regid {UNPRIVILEGED} --clear-groups {LAUNCHER} "$@"\n')
    wrapper.chmod(0o755)
    found = {}
    for isolation in ("namespaces", "seccomp"):
        sandbox = get_sandbox(isolations=(isolation,), launcher=str(wrapper))
        if sandbox.contained:
            found[f"user-{isolation}"] = CodeJudge(sandbox, LIMITS, find_cxx())
    if not found:
        pytest.skip("neither isolation works for an unprivileged user here")
    return found


def answer(source: str, language: str = "python") -> str:
    return f" <think>plan</think> <answer>```{language}\n{source}\n```</answer>"


def score(judge, source, expected="ok", language="python", stdin=""):
    """(reward, wall seconds) of `source` against one test expecting `expected`."""
    started = time.monotonic()
    reward, _ = code_reward(answer(source, language), CodeTests(io=((stdin, expected),)), judge)
    return reward, time.monotonic() - started


def processes_with(marker: bytes, timeout_s: float = 2.0) -> list[int]:
    """Pids (other than ours) whose command line holds `marker`, after waiting up to timeout_s for them to go."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                        found.append(int(entry))
                except OSError:
                    pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def open_dir(tmp_path) -> Path:
    """A directory anyone may write: only the sandbox can keep the program out of it."""
    tmp_path.chmod(0o777)
    for parent in tmp_path.parents:
        if parent == Path("/tmp") or parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    return tmp_path


# --------------------------------------------------------------------------- sanity: the judge works in every mode
def test_correct_programs_pass(judge):
    assert score(judge, "print(input()[::-1])", "olleh", stdin="hello")[0] == 1.0
    assert score(judge, "import sys\nsys.exit(3)")[0] == 0.0


# --------------------------------------------------------------------------- resources
def test_fork_bomb(judge):
    reward, wall = score(judge, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert reward == 0.0 and wall < BOUND_S
    assert processes_with(HARNESS_MARK) == []
    assert subprocess.run(["true"], check=False).returncode == 0  # this machine still forks


def test_memory_bomb(judge):
    reward, wall = score(judge, "x = []\nwhile True:\n    x.append(bytearray(1 << 24))\nprint('ok')")
    assert reward == 0.0 and wall < BOUND_S


def test_infinite_loop(judge):
    reward, wall = score(judge, "while True:\n    pass")
    assert reward == 0.0 and wall < BOUND_S
    assert processes_with(HARNESS_MARK) == []


def test_busy_threads(judge):
    source = "import threading\ndef spin():\n    while True:\n        pass\n" \
             "for _ in range(8):\n    threading.Thread(target=spin).start()\nspin()"
    reward, wall = score(judge, source)
    assert reward == 0.0 and wall < BOUND_S
    assert processes_with(HARNESS_MARK) == []


def test_sleep_past_the_limit(judge):
    marker = f"r1mark{uuid.uuid4().hex}"
    reward, wall = score(judge, f"import os, time\nos.system('sleep 30 # {marker}')\nprint('ok')")
    assert reward == 0.0 and wall < BOUND_S
    assert processes_with(marker.encode()) == []


def test_gigabytes_of_output(judge):
    reward, wall = score(judge, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert reward == 0.0 and wall < BOUND_S


def test_launcher_caps_output_without_buffering_it(judge):
    limits = Limits(wall_s=1, cpu_s=1, output_bytes=1 << 20)
    result = judge.sandbox.run([judge.sandbox.python, "-I", "-S", "-c",
                                "import os\nwhile True: os.write(1, b'y' * 65536)"], limits=limits)
    assert result.status in ("timeout", "signaled") and result.stdout_truncated
    assert len(result.stdout) == 1 << 20 and set(result.stdout) == {ord("y")}


def test_huge_file(judge):
    source = "with open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(bytes(1 << 20))\n" \
             "import os\nprint(os.path.getsize('big'))"
    reward, wall = score(judge, source, expected=str(1 << 30))
    assert reward == 0.0 and wall < BOUND_S


def test_raising_its_own_limits(judge):
    source = ("import resource\nraised = []\nfor r in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_NPROC,"
              " resource.RLIMIT_FSIZE):\n    try:\n        resource.setrlimit(r, (resource.RLIM_INFINITY,"
              " resource.RLIM_INFINITY))\n        raised.append(r)\n    except (ValueError, OSError):\n        pass\n"
              "print('raised' if raised else 'kept')\nwhile raised:\n    pass")
    reward, wall = score(judge, source, expected="raised")
    assert reward == 0.0 and wall < BOUND_S


@pytest.mark.skipif(find_cxx() is None, reason="no C++ compiler")
def test_cpp_allocating_forever(judge):
    source = "#include <cstring>\nint main() { for (;;) { char *p = new char[1 << 24]; std::memset(p, 1, 1 << 24); } }"
    judge = dataclasses.replace(judge, limits=dataclasses.replace(LIMITS, compile_timeout_s=30.0))  # compiles, runs
    started = time.monotonic()
    verdict = judge.judge("cpp", source, CodeTests(io=(("", "ok"),)))
    # compiled and ran: std::bad_alloc aborts it (or, on a loaded machine, the wall clock ends it first)
    assert verdict.statuses in (("signal",), ("exit",), ("timeout",)) and not verdict.note
    assert verdict.reward == 0.0 and time.monotonic() - started < 30.0 + BOUND_S


@pytest.mark.skipif(find_cxx() is None, reason="no C++ compiler")
def test_compile_bomb(judge):
    source = ("template <int N, long M> struct B { static const long v = B<N - 1, 2 * M>::v + B<N - 1, 2 * M + 1>::v; };"
              "\ntemplate <long M> struct B<0, M> { static const long v = M; };\n"
              "#include <cstdio>\nint main() { std::printf(\"%ld\\n\", B<40, 0>::v); }")
    started = time.monotonic()
    verdict = judge.judge("cpp", source, CodeTests(io=(("", "ok"),)))
    assert verdict.reward == 0.0 and verdict.note.startswith("compile error")
    assert time.monotonic() - started < LIMITS.compile_timeout_s + 4
    assert processes_with(HARNESS_MARK) == []


# --------------------------------------------------------------------------- network
def test_loopback_connect_and_listen(judge):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port, connections, stop = listener.getsockname()[1], [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connections.append(listener.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    source = (f"import socket\nok = []\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
              "    ok.append('host')\nexcept OSError:\n    pass\ntry:\n    s = socket.socket()\n    s.bind(('127.0.0.1', 0))\n"
              "    s.listen(1)\n    socket.create_connection(s.getsockname(), timeout=1)\n    ok.append('self')\n"
              "except OSError:\n    pass\nprint(' '.join(ok))")
    try:
        reward, wall = score(judge, source, expected="host self")
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert reward == 0.0 and wall < BOUND_S
    assert connections == []


# --------------------------------------------------------------------------- files
def test_writing_outside_its_directory(judge, tmp_path):
    target, shared = open_dir(tmp_path) / "pwned", Path(f"/tmp/r1-pwned-{uuid.uuid4().hex}")
    source = f"for path in ({str(target)!r}, {str(shared)!r}):\n    open(path, 'w').write('x')\nprint('ok')"
    reward, _ = score(judge, source)
    assert reward == 0.0 and not target.exists() and not shared.exists()


def test_deleting_a_file_outside(judge, tmp_path):
    victim = open_dir(tmp_path) / "victim"
    victim.write_text("keep me")
    victim.chmod(0o666)
    reward, _ = score(judge, f"import os\nos.remove({str(victim)!r})\nprint('ok')")
    assert reward == 0.0 and victim.read_text() == "keep me"


def test_reading_a_file_outside(judge, tmp_path):
    secret = open_dir(tmp_path) / "secret"
    secret.write_text(uuid.uuid4().hex)
    secret.chmod(0o644)
    reward, _ = score(judge, f"print(open({str(secret)!r}).read())", expected=secret.read_text())
    assert reward == 0.0


@pytest.mark.skipif(not os.access("/etc/shadow", os.R_OK), reason="/etc/shadow is not readable to compare with")
def test_reading_etc_shadow(judge):
    reward, _ = score(judge, "print(open('/etc/shadow').read(), end='')", expected=Path("/etc/shadow").read_text())
    assert reward == 0.0


# --------------------------------------------------------------------------- the caller
def test_reading_the_parents_environment(judge, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("R1_TEST_SECRET", secret)
    source = (f"import os\nfound = ''\nfor pid in [os.getppid(), {os.getpid()}] + [p for p in os.listdir('/proc')"
              " if p.isdigit()]:\n    try:\n        env = open(f'/proc/{pid}/environ', 'rb').read()\n    except OSError:\n"
              "        continue\n    for item in env.split(b'\\0'):\n        if item.startswith(b'R1_TEST_SECRET='):\n"
              "            found = item.split(b'=', 1)[1].decode()\nprint(found)")
    reward, _ = score(judge, source, expected=secret)
    assert reward == 0.0


def test_output_matching_only_with_the_parents_secret(judge, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("R1_TEST_SECRET", secret)
    reward, _ = score(judge, "import os\nprint(os.environ.get('R1_TEST_SECRET', 'none'))", expected=secret)
    assert reward == 0.0


def test_signalling_the_caller(judge):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        source = (f"import os, signal\nfor pid in ({os.getpid()}, {bystander.pid}, os.getppid(), 1, -1):\n    try:\n"
                  "        os.kill(pid, signal.SIGUSR1)\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n"
                  "        pass\nprint('sent')")
        reward, _ = score(judge, source, expected="never")
        time.sleep(0.2)
        assert reward == 0.0 and received == [] and bystander.poll() is None
    finally:
        signal.signal(signal.SIGUSR1, previous)
        bystander.kill()
        bystander.wait()


def test_orphan_that_tries_to_outlive_the_run(judge, tmp_path):
    marker = f"r1mark{uuid.uuid4().hex}"
    late = open_dir(tmp_path) / "late"
    source = (f"import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep 2; echo x > {late} # {marker}'],"
              " start_new_session=True)\nprint('ok')")
    reward, _ = score(judge, source, expected="never")
    assert reward == 0.0 and processes_with(marker.encode()) == []
    time.sleep(0.3)
    assert not late.exists()


def test_kernel_surface_namespaces_tracing_io_uring(judge):
    source = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(256)\n"
              "done = [libc.unshare(0x10000000) == 0, libc.ptrace(16, os.getppid(), 0, 0) == 0,\n"
              "        libc.syscall(425, 8, buf) >= 0]  # a user namespace, attaching to the harness, io_uring_setup\n"
              "print(sum(done))")
    reward, wall = score(judge, source, expected="3")
    assert reward == 0.0 and wall < BOUND_S
    assert score(judge, source.replace("print(sum(done))", "print(sum(done) == 0)"), expected="True")[0] == 1.0


def test_exit_zero_before_the_asserts(judge):
    for escape in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()"):
        completion = answer(f"def double(x):\n    return x + 1\n{escape}")
        reward, metrics = code_reward(completion, CodeTests(test_code="assert double(3) == 6"), judge)
        assert reward == 0.0 and metrics["code_pass_frac"] == 0.0


# --------------------------------------------------------------------------- issue 29: the judge, attacked
LANDLOCK_CAP = "R1_SANDBOX_LANDLOCK_ABI_MAX"  # read by native/sandbox.c: run as on a kernel with at most this ABI
SANDBOX_UID_BASE = 0x60000000


def _wrapper(tmp_path_factory, uid: int) -> Path:
    wrapper = tmp_path_factory.mktemp("wrap") / "r1-sandbox-as-user"
    wrapper.write_text(f'#!/bin/sh\nchown {uid}:{uid} "$2"\n'
                       f'exec setpriv --reuid {uid} --regid {uid} --clear-groups {LAUNCHER} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(scope="module")
def fallbacks(tmp_path_factory):
    """The seccomp fallback in every form this machine can run: as the caller (root: a uid of its own) and, as root,
    started as an unprivileged user (which shares its uid with that user's other processes)."""
    found = {}
    if "seccomp" in JUDGES:
        found["seccomp"] = JUDGES["seccomp"]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        sandbox = get_sandbox(isolations=("seccomp",), launcher=str(_wrapper(tmp_path_factory, UNPRIVILEGED)))
        if sandbox.contained:
            found["user-seccomp"] = CodeJudge(sandbox, LIMITS, find_cxx())
    if not found:
        pytest.skip("the seccomp fallback cannot run here")
    return found


def _judge_io(judge, source, tests, test_timeout_s=None):
    if test_timeout_s is not None:  # room for a loaded machine where the test's timing is not the point
        judge = dataclasses.replace(judge, limits=dataclasses.replace(LIMITS, test_timeout_s=test_timeout_s,
                                                                      completion_timeout_s=30.0))
    return judge.judge("python", source, CodeTests(io=tuple(tests)))


# 1. sockets: AF_UNIX only, in both isolations (AF_VSOCK ignores network namespaces)
def test_sockets_other_than_af_unix_are_refused(judge):
    source = ("import socket\nmade = []\nfor family, kind in ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET6,"
              " socket.SOCK_DGRAM), (socket.AF_VSOCK, socket.SOCK_STREAM), (socket.AF_NETLINK, socket.SOCK_RAW),"
              " (socket.AF_PACKET, socket.SOCK_DGRAM), (socket.AF_ALG, socket.SOCK_SEQPACKET)):\n"
              "    try:\n        s = socket.socket(family, kind)\n        made.append(str(family))\n"
              "        if family == socket.AF_VSOCK:\n            s.bind((socket.VMADDR_CID_ANY, 54321))\n"
              "            s.listen(1)\n    except OSError:\n        pass\n"
              "a, b = socket.socketpair()\na.send(b'x')\nprint(' '.join(made) or 'refused', b.recv(1).decode())")
    assert score(judge, source, expected="refused x")[0] == 1.0


# 2. tests of one program share no process, no input, no time
def test_a_test_never_holds_later_tests_inputs(judge):
    marker = "r1in" + "-"  # not one constant: the program's own code objects must not match
    source = ("import gc, sys\nme = sys.stdin.read().strip()\nmark = 'r1in' + '-'\nseen = []\n"
              "def look(x):\n    if isinstance(x, bytes):\n        x = x.decode('latin-1')\n"
              "    if isinstance(x, str) and mark in x and x.strip() not in (me, mark):\n        seen.append(x)\n"
              "for o in gc.get_objects():\n    if o is seen:\n        continue\n"
              "    if isinstance(o, dict):\n        o = list(o.values())\n"
              "    if isinstance(o, (list, tuple, set, frozenset)):\n        for v in o:\n            look(v)\n"
              "f = sys._getframe()\nwhile f is not None:\n    for v in list(f.f_locals.values()):\n        look(v)\n"
              "    f = f.f_back\nprint('clean' if not seen else 'leak')")
    verdict = _judge_io(judge, source, [(f"{marker}{i}\n", "clean") for i in range(3)], test_timeout_s=5.0)
    assert verdict.statuses == ("pass",) * 3


def test_background_processes_die_with_their_test(judge):
    source = ("import os, time\nn = input()\nif n == '0':\n    if os.fork() == 0:\n        os.setsid()\n"
              "        if os.fork() == 0:\n            for i in range(100):\n"
              "                open('beat', 'w').write(str(i))\n"
              "                time.sleep(0.05)\n        os._exit(0)\n    time.sleep(0.2)\n    print('ok')\nelse:\n"
              "    time.sleep(0.3)\n    print('shared' if os.path.exists('beat') else 'alone')")
    verdict = _judge_io(judge, source, [("0\n", "ok"), ("1\n", "alone")], test_timeout_s=3.0)
    assert verdict.statuses == ("pass", "pass")


def test_a_test_cannot_cancel_its_time_limit(judge):
    # test 0 outlives its 2 s limit by 0.3 s unless killed; test 1 watches for it for 1.2 s of its own 2 s
    source = ("import os, signal, time\nn = input()\nif n == '0':\n    signal.setitimer(signal.ITIMER_REAL, 0)\n"
              "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    time.sleep(2.3)\n"
              "    open('late', 'w').write('x')\n"
              "    print('ok')\nelse:\n    seen = False\n    for _ in range(24):\n"
              "        seen = seen or os.path.exists('late')\n        time.sleep(0.05)\n"
              "    print('pooled' if seen else 'alone')")
    verdict = _judge_io(judge, source, [("0\n", "ok"), ("1\n", "alone")], test_timeout_s=2.0)
    assert verdict.statuses == ("timeout", "pass")


# 3. the fallback on a kernel without Landlock's signal scoping (ABI < 6): no signals through file owners
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to start a bystander")
def test_file_signal_owners_cannot_reach_a_bystander(fallbacks, monkeypatch):
    monkeypatch.setenv(LANDLOCK_CAP, "5")
    judge = fallbacks.get("user-seccomp")
    if judge is None:
        pytest.skip("the fallback cannot run as an unprivileged user here")
    bystander = subprocess.Popen(["setpriv", "--reuid", str(UNPRIVILEGED), "--regid", str(UNPRIVILEGED),
                                  "--clear-groups", "sleep", "30"])
    try:
        time.sleep(0.2)
        pid = bystander.pid
        source = ("import fcntl, os, struct\nr, w = os.pipe()\ndone = []\n"
                  f"for name, call in (('own', lambda: fcntl.fcntl(r, fcntl.F_SETOWN, {pid})),\n"
                  "                   ('sig', lambda: fcntl.fcntl(r, 10, 15)),\n"
                  "                   ('async', lambda: fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)),\n"
                  f"                   ('ioctl', lambda: fcntl.ioctl(r, 0x8901, struct.pack('i', {pid}))),\n"
                  f"                   ('pgrp', lambda: fcntl.ioctl(r, 0x8902, struct.pack('i', {pid})))):\n"
                  "    try:\n        call()\n        done.append(name)\n    except OSError:\n        pass\n"
                  "os.write(w, b'x')\nprint(' '.join(done) or 'refused')")
        reward, _ = score(judge, source, expected="refused")
        time.sleep(0.3)
        assert bystander.poll() is None, "the program signalled a process of its uid outside the sandbox"
        assert reward == 1.0
    finally:
        bystander.kill()
        bystander.wait()


# 4. seccomp without Landlock is not contained (as root too), so the judge refuses it unless allowed
def test_seccomp_without_landlock_is_refused(monkeypatch):
    from r1_engine.engine.rewards import code

    monkeypatch.setenv(LANDLOCK_CAP, "0")
    sandbox = get_sandbox.__wrapped__(isolations=("seccomp",))
    if sandbox.isolation != "seccomp":
        pytest.skip(f"the seccomp fallback cannot run here: {sandbox.detail}")
    assert "landlock" not in sandbox.detail and not sandbox.contained
    monkeypatch.setattr(code, "get_sandbox", lambda: sandbox)
    with pytest.raises(ValueError, match="allow-unsandboxed-code"):
        code.make_code_judge()


# 5. a test cannot reopen the harness's (or the launcher's) stdout through /proc and forge a pass
def test_reopening_the_results_through_proc(fallbacks):
    forge = ("import os\nparent = os.getppid()\ntry:\n    grand = int(open(f'/proc/{parent}/stat').read()"
             ".rsplit(')', 1)[1].split()[1])\nexcept (OSError, ValueError, IndexError):\n    grand = parent\n"
             "reopened = []\nfor pid in (parent, grand):\n    try:\n"
             "        with open(f'/proc/{pid}/fd/1', 'wb', buffering=0) as f:\n"
             "            f.write(b'R1T 0 ok 0 0\\n')\n        reopened.append(pid)\n"
             "    except OSError:\n        pass\n")
    for judge in fallbacks.values():
        reward, _ = code_reward(answer(forge + "def f():\n    return 1\n"), CodeTests(test_code="assert f() == 2"),
                                judge)
        assert reward == 0.0


# 6. the fallback has no IPC namespace: SysV IPC and POSIX message queues are refused
def test_sysv_ipc_and_message_queues_stay_in(judge):
    key = int(uuid.uuid4().int % (1 << 30)) + 1
    source = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nmade = []\n"
              f"if libc.shmget({key}, 16 << 20, 0o1000 | 0o600) >= 0:\n    made.append('shm')\n"
              f"if libc.msgget({key}, 0o1000 | 0o600) >= 0:\n    made.append('msg')\n"
              f"if libc.semget({key}, 1, 0o1000 | 0o600) >= 0:\n    made.append('sem')\n"
              "try:\n    mq_open = libc.mq_open\nexcept AttributeError:\n    mq_open = None\n"
              "if mq_open is not None and mq_open(b'/r1-q', 0o100 | 2, 0o600, None) >= 0:\n    made.append('mq')\n"
              "print(' '.join(made) or 'refused')")
    reward, _ = score(judge, source, expected="refused")
    left = [line for name in ("shm", "msg", "sem") if os.path.exists(f"/proc/sysvipc/{name}")
            for line in Path(f"/proc/sysvipc/{name}").read_text().splitlines()[1:] if line.split()[0] == str(key)]
    if left:
        subprocess.run(["ipcrm", "-M", str(key), "-Q", str(key), "-S", str(key)], check=False, capture_output=True)
    assert left == [], "an IPC object outlived the run"
    if judge.sandbox.isolation == "seccomp":
        assert reward == 1.0  # namespaces: they exist in the run's own IPC namespace and die with it


# 7. processes: a uid per run (root) so a concurrent fork bomb cannot starve a correct program; as a normal user the
# fallback shares RLIMIT_NPROC with the uid (which --build says) unless given a delegated cgroup ($R1_SANDBOX_CGROUP)
def test_a_fork_bomb_does_not_starve_a_concurrent_run(judge):
    if judge.sandbox.isolation == "seccomp" and os.geteuid() != 0:
        pytest.skip("a normal user's fallback shares RLIMIT_NPROC with the uid (documented; see the cgroup test)")
    statuses, bomb_reward = _starved(judge)
    assert statuses == ("pass",) * 3 and bomb_reward == 0.0


def _starved(judge):
    """(a correct program's statuses, a fork bomb's reward) with the bomb started while the correct one runs (the
    order in which a uid-wide RLIMIT_NPROC lets the bomb take the processes the correct one needs)."""
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.001)"
    correct = "import time\nn = int(input())\ntime.sleep(0.4)\nprint(2 * n)"
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault(
        "correct", _judge_io(judge, correct, [(f"{i}\n", f"{2 * i}") for i in range(3)], test_timeout_s=3.0)))
    thread.start()
    time.sleep(0.3)
    bomb_reward = score(judge, bomb)[0]
    thread.join()
    return results["correct"].statuses, bomb_reward


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/sys/fs/cgroup/pids"),
                    reason="needs root and a cgroup v1 pids hierarchy to delegate a cgroup to a normal user")
def test_a_delegated_cgroup_bounds_processes_per_run_for_a_normal_user(fallbacks, monkeypatch):
    judge = fallbacks.get("user-seccomp")
    if judge is None:
        pytest.skip("the fallback cannot run as an unprivileged user here")
    delegated = Path(f"/sys/fs/cgroup/pids/r1-test-{uuid.uuid4().hex[:12]}")
    try:
        delegated.mkdir()
    except OSError as err:
        pytest.skip(f"cannot make a cgroup here: {err}")
    try:
        for path in (delegated, *delegated.iterdir()):
            os.chown(path, UNPRIVILEGED, UNPRIVILEGED)
        monkeypatch.setenv("R1_SANDBOX_CGROUP", str(delegated))
        statuses, bomb_reward = _starved(judge)
        assert statuses == ("pass",) * 3 and bomb_reward == 0.0
        assert [p.name for p in delegated.iterdir() if p.is_dir()] == []  # each run removed its own cgroup
    finally:
        for child in [p for p in delegated.iterdir() if p.is_dir()]:
            child.rmdir()
        delegated.rmdir()


def test_build_states_the_process_bound():
    from r1_engine.engine.sandbox import Sandbox, protections

    seccomp = get_sandbox(isolations=("seccomp",))
    if seccomp.launcher is None:
        pytest.skip("no launcher")
    text = "\n".join(protections(seccomp))
    assert ("own" in text) if os.geteuid() == 0 else ("SHARED" in text)
    done = subprocess.run([os.sys.executable, "-m", "r1_engine.engine.sandbox"], capture_output=True, text=True,
                          check=False, timeout=120)
    for what in ("AF_VSOCK", "share no process", "F_SETOWN", "non-dumpable", "message queues", "memfd",
                 "RLIMIT_NPROC", "disk"):
        assert what in done.stdout, what
    assert protections(Sandbox(None, "rlimits", "", "python3"))[0].startswith("none")


# 8. memory: memfd_create is refused (it is outside the address-space limit)
def test_memfd_is_refused(judge):
    source = ("import os\ntry:\n    fd = os.memfd_create('x')\n    os.ftruncate(fd, 1 << 20)\n    print('made')\n"
              "except OSError:\n    print('refused')")
    assert score(judge, source, expected="refused")[0] == 1.0


def test_the_work_directory_is_bounded(judge):
    limits = Limits(wall_s=8, cpu_s=8, file_size_mb=8, work_mb=16)
    python = [judge.sandbox.python, "-I", "-S", "-c"]
    many_bytes = ("for i in range(40):\n    with open(f'f{i}', 'wb') as f:\n        f.write(b'x' * (4 << 20))\n"
                  "print('wrote')")
    result = judge.sandbox.run([*python, many_bytes], limits=limits)
    assert b"wrote" not in result.stdout and not result.ok  # 160 MB in files of 4 MB, past a 16 MB work directory
    many_files = "for i in range(6000):\n    open(f'e{i}', 'w').close()\nprint('wrote')"
    result = judge.sandbox.run([*python, many_files], limits=limits)
    assert b"wrote" not in result.stdout and not result.ok  # past the 4096 entries


def test_the_fallback_cannot_watch_files_outside(fallbacks):
    source = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
              "print('refused' if libc.inotify_init1(0) < 0 and libc.fanotify_init(0, 0) < 0 else 'watching')")
    for judge in fallbacks.values():
        assert score(judge, source, expected="refused")[0] == 1.0


# 9. the per-run uid (root): the launcher's pid above a fixed base, never a pid modulo something
@pytest.mark.skipif(os.geteuid() != 0, reason="a uid per run is given only as root")
def test_the_per_run_uid_is_the_launchers_pid(tmp_path):
    fallback = get_sandbox(isolations=("seccomp",))

    def start():
        job = tmp_path / uuid.uuid4().hex
        job.mkdir()
        job.chmod(0o711)
        (job / "root").mkdir()
        binds = [arg for path in fallback.binds for arg in ("--bind", path)]
        return subprocess.Popen([str(LAUNCHER), "--dir", str(job / "root"), "--isolation", "seccomp", "--wall", "5",
                                 *binds, "--", fallback.python, "-I", "-S", "-c",
                                 "import os, time\ntime.sleep(0.5)\nprint(os.getuid())"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    runs = [start(), start()]
    uids = [int(run.communicate(timeout=30)[0] or -1) for run in runs]
    assert uids == [SANDBOX_UID_BASE + run.pid for run in runs] and uids[0] != uids[1]


# --------------------------------------------------------------------------- as an unprivileged user
USER_CASES = [test_correct_programs_pass, test_fork_bomb, test_writing_outside_its_directory,
              test_deleting_a_file_outside, test_reading_a_file_outside, test_reading_the_parents_environment,
              test_signalling_the_caller, test_loopback_connect_and_listen, test_orphan_that_tries_to_outlive_the_run,
              test_kernel_surface_namespaces_tracing_io_uring, test_sockets_other_than_af_unix_are_refused,
              test_a_test_never_holds_later_tests_inputs, test_background_processes_die_with_their_test,
              test_a_test_cannot_cancel_its_time_limit, test_sysv_ipc_and_message_queues_stay_in, test_memfd_is_refused,
              test_the_work_directory_is_bounded]


@pytest.mark.parametrize("case", USER_CASES, ids=[c.__name__.removeprefix("test_") for c in USER_CASES])
def test_as_an_unprivileged_user(case, user_judges, tmp_path, monkeypatch):
    for judge in user_judges.values():
        kwargs = {"tmp_path": tmp_path / judge.sandbox.isolation, "monkeypatch": monkeypatch}
        names = case.__code__.co_varnames[:case.__code__.co_argcount]
        if "tmp_path" in names:
            kwargs["tmp_path"].mkdir()
        case(judge, **{k: v for k, v in kwargs.items() if k in names})
