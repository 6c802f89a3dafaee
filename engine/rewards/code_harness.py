"""The code judge's harness: runs inside the sandbox (`python -I -S -c <this file>`), once per completion, and runs the
completion's program on each test. engine/rewards/code.py sends the job and reads the results; expected outputs
never enter the sandbox (they are compared outside).

Job (stdin: frames of an 8-byte little-endian length + marshal format 4 data, no import to pay for, where json costs
more than the interpreter start): first {"programs": [{"language": "python" | "cpp", "source": str, "tests": n,
"asserts": bool}], "test_timeout_s", "test_cpu_s", "memory_mb", "file_size_mb", "compile": {"argv": [...],
"timeout_s", "cpu_s", "memory_mb", "file_size_mb"}}, then one frame (stdin text, stdout bytes allowed) per test, in
order. A test's frame is read from the pipe only right before that test forks (os.read of exactly its length: no
read-ahead buffer), so the fork of test i holds test i's input and no later one.
Results (stdout): per program b"R1C <ok|error> <n>\\n" + n bytes of compiler/syntax log, then per test
b"R1T <index> <status> <exit code> <n>\\n" + n bytes of its stdout; b"R1END\\n" last.

Python programs run in a fork of this process (no interpreter start per test: a test costs about a millisecond), in
a fresh __main__ with stdin/stdout/stderr rebuilt on the test's files. C++ is compiled once per program, here, under
the compile limits, and each test execs the binary. Each test runs in its own process group with its own rlimits
(soft = hard) and an interval timer; whatever it does, the harness kills its whole process tree (setsid orphans
included) when it exits, passes the wall limit or the output cap, before the next test starts, and removes the files
it left in the cwd: tests share no process, no file and no time. The tree kill: in the namespaces isolation
kill(-1) from here (the PID namespace holds only init, this harness and the test's processes); in the seccomp
fallback, where seccomp lets this process signal only its own process group, the launcher kills every descendant
but this harness when asked on the reap channel ($R1_SANDBOX_REAP_FD); without the launcher (rlimits), the test's
process group only. Where /proc exists (fallback, rlimits) the harness makes itself non-dumpable, so a test cannot
open its stdout (the results) or read its memory through /proc/<ppid>/.

Assert-style tests (`asserts`: the test code is already appended to the source) pass when the program exits 0 after
printing a per-test nonce that the harness adds after the test code ran to its end: exiting early with status 0
(exit(0), os._exit(0)) does not pass. A failed assert-style test is trustworthy; a passed one is not proof against a
hostile program: code in the test's own process can read the nonce from this harness's frames (sys._getframe),
override __eq__, or (C++, which passes on exit status 0) exit(0) from a static initializer.
"""
import _signal as signal  # the signal module would import enum: 6 ms a completion
import builtins
import io
import marshal
import os
import resource
import select
import sys
import time

ISOLATION = os.environ.pop("R1_SANDBOX_ISOLATION", "")  # set by the launcher; not the tests' business
REAP_FD = os.environ.pop("R1_SANDBOX_REAP_FD", None)
KEEP = {"prog", "prog.cpp"}  # the compiled program survives between tests; nothing else does


def set_limits(cpu_s, memory_mb, file_size_mb):
    for which, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_mb << 20),
                         (resource.RLIMIT_FSIZE, file_size_mb << 20)):
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def child_setup(stdin_fd, out_w, err_w, cpu_s, memory_mb, file_size_mb, wall_s):
    """In a forked child: own process group, the test's stdio, no other fds, limits, the wall-clock timer."""
    os.setpgid(0, 0)
    os.dup2(stdin_fd, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    set_limits(cpu_s, memory_mb, file_size_mb)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, wall_s + 0.25)  # after the harness's own deadline, where it may kill


def run_python(code, nonce):
    """In the forked child: run `code` as a script's __main__; never returns."""
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.argv = ["solution.py"]
    main = type(sys)("__main__")
    main.__file__ = "solution.py"
    sys.modules["__main__"] = main
    status, finished = 0, False
    try:
        exec(code, main.__dict__)  # noqa: S102 (running the program is the point; this is the sandbox)
        finished = True
    except SystemExit as stop:
        code_ = stop.code
        status = 0 if code_ is None else code_ if isinstance(code_, int) else 1
        if not isinstance(code_, (int, type(None))):
            print(code_, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (what the interpreter does with an uncaught error)
        import traceback

        traceback.print_exc()
        status = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        if finished and nonce:
            print(f"\n{nonce}")
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 (a failing flush fails the run)
        status = status or 1
    os._exit(status & 0xFF)


def collect(pid, out_r, err_r, deadline, cap):
    """Read the child's stdout (up to cap) and stderr (dropped) until it exits and its pipes close, or the deadline;
    returns (status, exit code, stdout). Then the child's whole process tree is killed, whatever happened."""
    poller = select.poll()
    streams = {out_r, err_r}
    for fd in streams:
        poller.register(fd, select.POLLIN)
    try:
        pidfd = os.pidfd_open(pid)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        pidfd = None
    chunks, size, verdict, wait_status = [], 0, None, None
    while verdict is None and (wait_status is None or streams):
        if wait_status is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                wait_status = status
                if pidfd is not None:
                    poller.unregister(pidfd)
                deadline = min(deadline, time.monotonic() + 0.5)  # a process it left may hold the pipes open
                continue
        left = deadline - time.monotonic()
        if left <= 0:
            verdict = "timeout" if wait_status is None else None  # exited; a leftover holds its pipes: stop reading
            break
        wait_s = left if pidfd is not None or wait_status is not None else min(left, 0.02)
        for fd, _ in poller.poll(wait_s * 1000):
            if fd == pidfd:
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                poller.unregister(fd)
                streams.discard(fd)
            elif fd == out_r:
                chunks.append(data)
                size += len(data)
                if size > cap:
                    verdict = "output_limit"
    for fd in (out_r, err_r, pidfd):
        if fd is not None:
            os.close(fd)
    kill_tree(pid)
    if wait_status is None:
        try:
            wait_status = os.waitpid(pid, 0)[1]
        except ChildProcessError:  # reaped by kill_tree
            pass
    if verdict is not None:
        return verdict, -1, b"".join(chunks)[:cap]
    if os.WIFSIGNALED(wait_status):
        return "signal", -1, b"".join(chunks)
    code = os.waitstatus_to_exitcode(wait_status)
    return ("ok" if code == 0 else "exit"), code, b"".join(chunks)


def kill_tree(pid):
    """SIGKILL every process a test (or the compiler) started, `pid` and setsid orphans included, and wait until they
    are gone (see the module's docstring for how, per isolation)."""
    try:
        os.killpg(pid, signal.SIGKILL)  # the seccomp fallback forbids it (EPERM): the launcher does it below
    except OSError:
        pass
    if REAP_FD is not None:
        os.write(int(REAP_FD), b"k")
        if os.read(int(REAP_FD), 1) != b"k":
            os._exit(3)  # the launcher is gone: nothing can be trusted any more
    elif ISOLATION == "namespaces" and os.getppid() == 1:
        give_up = time.monotonic() + 5.0
        while time.monotonic() < give_up:
            try:
                os.kill(-1, signal.SIGKILL)  # every process of the namespace but init and this one
            except ProcessLookupError:
                break  # none left, zombies included (init reaps the orphans, this loop its own children)
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
            time.sleep(0.001)


def clean_cwd():
    """Remove what the last test left in the cwd (tests share no files), through directories it made unwritable."""
    for name in os.listdir("."):
        if name not in KEEP:
            remove(name)


def remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            for name in os.listdir(path):
                remove(os.path.join(path, name))
            os.rmdir(path)
        else:
            os.unlink(path)
    except OSError:
        pass


def read_exact(n):
    """Exactly n bytes of stdin, read with os.read: nothing beyond them is read ahead into this process."""
    parts = []
    while n > 0:
        data = os.read(0, min(n, 1 << 20))
        if not data:
            raise EOFError("the job ended early")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def read_frame():
    return marshal.loads(read_exact(int.from_bytes(read_exact(8), "little")))


def make_undumpable():
    """Where /proc exists (the seccomp fallback, rlimits): no /proc/<pid>/fd, mem or environ of this process for
    the tests (same uid), and none for their forks until they exec."""
    if not os.path.isdir("/proc/self"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        os._exit(4)


def run_test(job, program, code, stdin_text, cap, nonce):
    """One test in a forked child; returns (status, exit code, stdout)."""
    fd = os.open(".stdin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, stdin_text.encode("utf-8"))
    os.lseek(fd, 0, os.SEEK_SET)
    os.unlink(".stdin")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            child_setup(fd, out_w, err_w, job["test_cpu_s"], job["memory_mb"], job["file_size_mb"],
                        job["test_timeout_s"])
            if program["language"] == "python":
                run_python(code, nonce)
            os.execv("./prog", ["./prog"])
        finally:
            os._exit(127)
    for f in (fd, out_w, err_w):
        os.close(f)
    status, exit_code, out = collect(pid, out_r, err_r, time.monotonic() + job["test_timeout_s"], cap)
    clean_cwd()
    if nonce and status == "ok":
        text = out.rstrip(b"\n")
        if not text.endswith(nonce.encode()):
            status = "no_sentinel"  # exited 0 before its test code ran to the end
        out = text[: len(text) - len(nonce)].rstrip(b"\n")
    return status, exit_code, out


def compile_cpp(job, source):
    """Compile source into ./prog under the compile limits; returns (ok, log)."""
    with open("prog.cpp", "w", encoding="utf-8") as f:
        f.write(source)
    spec = job["compile"]
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    pid = os.fork()
    if pid == 0:
        try:
            child_setup(null, out_w, out_w, spec["cpu_s"], spec["memory_mb"], spec["file_size_mb"], spec["timeout_s"])
            os.execv(spec["argv"][0], spec["argv"])
        finally:
            os._exit(127)
    err_r, err_w = os.pipe()  # collect() reads two streams; the compiler's are merged into one
    for fd in (out_w, null, err_w):
        os.close(fd)
    status, _, log = collect(pid, out_r, err_r, time.monotonic() + spec["timeout_s"], 4096)
    return status == "ok" and os.path.exists("prog"), (log if status in ("ok", "exit") else f"compiler: {status}".encode())


def frame(header, payload=b""):
    sys.stdout.buffer.write(header.encode() + b" " + str(len(payload)).encode() + b"\n" + payload)
    sys.stdout.buffer.flush()


def main():
    make_undumpable()
    job = read_frame()
    builtins.exit = builtins.quit = sys.exit  # what site would have added (-S skips it)
    index = 0
    for program in job["programs"]:
        code = None
        if program["language"] == "python":
            try:
                code = compile(program["source"], "solution.py", "exec")
                ok, log = True, b""
            except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as err:
                ok, log = False, f"{type(err).__name__}: {err}".encode("utf-8", "replace")
        else:
            ok, log = compile_cpp(job, program["source"])
        frame(f"R1C {'ok' if ok else 'error'}", log)
        for _ in range(program["tests"]):
            stdin_text, cap = read_frame()
            if ok:
                nonce = os.urandom(16).hex() if program["asserts"] and code is not None else ""  # C++: exit 0
                status, exit_code, out = run_test(job, program, code, stdin_text, cap, nonce)
                frame(f"R1T {index} {status} {exit_code}", out)
            index += 1
    sys.stdout.buffer.write(b"R1END\n")
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
