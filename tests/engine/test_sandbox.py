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


# --------------------------------------------------------------------------- as an unprivileged user
USER_CASES = [test_correct_programs_pass, test_fork_bomb, test_writing_outside_its_directory,
              test_deleting_a_file_outside, test_reading_a_file_outside, test_reading_the_parents_environment,
              test_signalling_the_caller, test_loopback_connect_and_listen, test_orphan_that_tries_to_outlive_the_run,
              test_kernel_surface_namespaces_tracing_io_uring]


@pytest.mark.parametrize("case", USER_CASES, ids=[c.__name__.removeprefix("test_") for c in USER_CASES])
def test_as_an_unprivileged_user(case, user_judges, tmp_path, monkeypatch):
    for judge in user_judges.values():
        kwargs = {"tmp_path": tmp_path / judge.sandbox.isolation, "monkeypatch": monkeypatch}
        names = case.__code__.co_varnames[:case.__code__.co_argcount]
        if "tmp_path" in names:
            kwargs["tmp_path"].mkdir()
        case(judge, **{k: v for k, v in kwargs.items() if k in names})
