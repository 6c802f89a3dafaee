"""Running untrusted programs (the code reward's judge): the native launcher `r1-sandbox` (native/sandbox.c), found
or built here, and one call that runs a program under it.

    sandbox = get_sandbox()                  # the launcher is built on first use when a C compiler exists
    result = sandbox.run([sandbox.python, "-I", "-S", "-c", "print(1)"], limits=Limits(wall_s=2))
    result.ok, result.stdout, sandbox.isolation             # True, b"1\\n", "namespaces"

`python -m r1_engine.engine.sandbox --build` compiles the launcher into build/r1-sandbox and prints the isolation this machine
gives: "namespaces" (fresh user/PID/network/mount/IPC namespaces, a read-only root, a tmpfs cwd) where the kernel
permits, else "seccomp" (a syscall filter, Landlock when the kernel has it, an own uid when started as root), and
which of the judge's protections (docs/code_judge.md) hold here. Without a C compiler, or when the launcher cannot
start a program here, the sandbox is "rlimits", a pure-Python fallback: the same limits, a clean environment and a
throwaway cwd, but nothing keeps a program from your files or the network. The seccomp fallback without Landlock is
no better as far as your files go (as root too: a uid of its own still reads world-readable files such as your
prompts with their expected outputs). Both warn loudly once per process, and the trainer refuses them unless
--reward.allow-unsandboxed-code.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = tuple(REPO / "native" / name for name in ("sandbox.c", "sandbox_setup.c", "sandbox_filters.c"))
HEADERS = (REPO / "native" / "sandbox.h",)
LAUNCHER = REPO / "build" / "r1-sandbox"
LAUNCHER_ENV = "R1_SANDBOX_LAUNCHER"  # a launcher built elsewhere (used as it is, never rebuilt)
SYSTEM_PREFIXES = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/")  # bound into the sandbox by the launcher itself
ISOLATIONS = ("namespaces", "seccomp", "rlimits")
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Limits:
    """What one run may use. cpu_s and the memory/file/process caps are rlimits (soft = hard); wall_s kills the whole
    process tree; stdout and stderr are kept up to output_bytes each (the rest is read and dropped)."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    processes: int = 64  # threads count too
    file_size_mb: int = 16
    open_files: int = 64
    work_mb: int = 64  # size of the throwaway cwd (namespaces: a tmpfs)
    output_bytes: int = 1 << 20


@dataclass
class RunResult:
    status: str  # exited | signaled | timeout | disk_limit (fallback) | exec_failed | setup_failed | error
    exit_code: int
    signal: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    wall_s: float
    note: str = ""
    detail: str = ""  # the launcher's account of the isolation it got

    @property
    def ok(self) -> bool:
        return self.status == "exited" and self.exit_code == 0


@dataclass(frozen=True)
class Sandbox:
    """How programs run here (picklable: reward workers get a copy). launcher None: the pure-Python fallback."""

    launcher: str | None
    isolation: str  # one of ISOLATIONS
    detail: str  # what the isolation holds ("user,pid,net,mount,ipc,uts", "seccomp+landlock+uid"), or why it is weak
    python: str  # the interpreter for Python programs (a real path)
    binds: tuple[str, ...] = ()  # read-only paths programs need beyond the system dirs (interpreter, compiler)

    @property
    def contained(self) -> bool:
        """Whether a hostile program is kept from the network, other processes and files outside its cwd: namespaces,
        or seccomp with Landlock. Not: seccomp without Landlock (even as root with a uid of its own, which still reads
        every world-readable file: the prompts and their expected outputs), or rlimits."""
        if self.isolation == "namespaces":
            return True
        return self.isolation == "seccomp" and "landlock" in self.detail

    def run(self, argv: Sequence[str], *, stdin: bytes = b"", files: Mapping[str, bytes] | None = None,
            limits: Limits = Limits()) -> RunResult:
        """Run argv (argv[0] absolute, or found on PATH=/usr/local/bin:/usr/bin:/bin) with `files` (name -> bytes)
        in its throwaway cwd and `stdin` as its input."""
        job = Path(tempfile.mkdtemp(prefix="r1-sandbox-"))
        try:
            os.chmod(job, 0o711)  # seccomp as root: the program's own uid must reach its cwd inside
            (job / "root").mkdir()
            if files:
                (job / "in").mkdir()
                for name, data in files.items():
                    if "/" in name or name in ("", ".", ".."):
                        raise ValueError(f"Sandbox.run: file name {name!r} must be a plain name")
                    (job / "in" / name).write_bytes(data)
            if self.launcher is None:
                return _run_unsandboxed(list(argv), stdin, job, limits)
            return self._run_launcher(list(argv), stdin, job, limits)
        finally:
            _remove_tree(job)

    def _run_launcher(self, argv: list[str], stdin: bytes, job: Path, limits: Limits) -> RunResult:
        report_r, report_w = os.pipe()
        args = [self.launcher, "--dir", str(job / "root"), "--isolation", self.isolation,
                "--wall", f"{limits.wall_s:g}", "--cpu", str(limits.cpu_s), "--mem", str(limits.memory_mb),
                "--nproc", str(limits.processes), "--fsize", str(limits.file_size_mb),
                "--nofile", str(limits.open_files), "--work-mb", str(limits.work_mb),
                "--out-cap", str(limits.output_bytes), "--report", str(report_w)]
        for path in self.binds:
            args += ["--bind", path]
        if (job / "in").is_dir():
            args += ["--copy", str(job / "in")]
        try:
            proc = subprocess.Popen([*args, "--", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=(report_w,))
        finally:
            os.close(report_w)
        with os.fdopen(report_r, "rb") as report_file:
            try:
                out, err = proc.communicate(stdin, timeout=limits.wall_s + 30)  # the launcher enforces wall_s
            except subprocess.TimeoutExpired:
                proc.kill()  # its setup process and init die with it (parent-death signals)
                out, err = proc.communicate()
                return RunResult("error", -1, 0, b"", b"", False, False, limits.wall_s, "the launcher hung")
            report = report_file.read().decode("utf-8", "replace")
        fields = dict(item.split("=", 1) for item in report.strip().split("\t") if "=" in item)
        if "status" not in fields:
            return RunResult("error", -1, 0, out, err, False, False, 0.0,
                             f"no report from {self.launcher} (exit code {proc.returncode}): {err[-300:]!r}")
        return RunResult(fields["status"], int(fields["exit_code"]), int(fields["signal"]), out, err,
                         fields["stdout_truncated"] == "1", fields["stderr_truncated"] == "1",
                         int(fields["wall_ms"]) / 1000, fields.get("note", ""), fields.get("detail", ""))


# --------------------------------------------------------------------------- the pure-Python fallback
def _run_unsandboxed(argv: list[str], stdin: bytes, job: Path, limits: Limits) -> RunResult:
    """rlimits, a clean environment, a throwaway cwd and a process-group kill; output through files capped by the
    file-size limit. A program can still read and write your files, use the network and escape with setsid."""
    import time

    work = job / "root"
    if (job / "in").is_dir():
        for path in (job / "in").iterdir():
            shutil.copy(path, work / path.name)
    (job / "stdin").write_bytes(stdin)
    caps = [(resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_mb << 20),
            (resource.RLIMIT_FSIZE, limits.file_size_mb << 20), (resource.RLIMIT_NOFILE, limits.open_files),
            (resource.RLIMIT_CORE, 0)]
    # the limits are set by a small exec wrapper (no preexec_fn: the caller may have threads)
    wrapper = (f"import os, resource, sys\nfor which, value in {caps!r}: resource.setrlimit(which, (value, value))\n"
               "os.execvp(sys.argv[1], sys.argv[1:])")
    env = {"PATH": CLEAN_PATH, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    started = time.monotonic()
    with open(job / "stdin", "rb") as fin, open(job / "stdout", "wb") as fout, open(job / "stderr", "wb") as ferr:
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", wrapper, *argv], stdin=fin, stdout=fout,
                                    stderr=ferr, cwd=work, env=env, start_new_session=True)
        except OSError as err:
            return RunResult("exec_failed", -1, 0, b"", b"", False, False, 0.0, f"exec {argv[0]}: {err}")
        try:
            proc.wait(timeout=limits.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            pass
        proc.wait()
    wall = time.monotonic() - started
    outputs = []
    for name in ("stdout", "stderr"):
        with open(job / name, "rb") as f:
            data = f.read(limits.output_bytes + 1)
        outputs += [data[:limits.output_bytes], len(data) > limits.output_bytes]
    code = proc.returncode
    status = "timeout" if timed_out else ("signaled" if code < 0 else "exited")
    return RunResult(status, code if code >= 0 else -1, -code if code < 0 else 0, outputs[0], outputs[2],
                     outputs[1], outputs[3], wall)


def _remove_tree(path: Path) -> None:
    """rm -rf, also through directories the program left without permissions."""
    def unlock(func, failed, _exc):
        parent = os.path.dirname(failed)
        os.chmod(parent, stat.S_IRWXU)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, stat.S_IRWXU)
            shutil.rmtree(failed, ignore_errors=True)
        else:
            os.unlink(failed)

    shutil.rmtree(path, onerror=unlock)


# --------------------------------------------------------------------------- building and probing
def find_compiler() -> str | None:
    """A C compiler: $CC, else cc, gcc or clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_launcher(out: Path = LAUNCHER, compiler: str | None = None) -> Path:
    """Compile native/sandbox*.c into `out` (atomically: concurrent builders are fine). RuntimeError without a C
    compiler or when the compile fails (its first error lines)."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    done = subprocess.run([compiler, "-O2", "-std=gnu11", "-o", str(partial), *map(str, SOURCES)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed to build {out}: {done.stderr.strip()[-600:]}")
    os.replace(partial, out)
    return out


def _fresh(launcher: Path) -> bool:
    built = launcher.stat().st_mtime
    return all(not src.exists() or src.stat().st_mtime <= built for src in (*SOURCES, *HEADERS))


def find_launcher(build: bool = True) -> tuple[Path | None, str]:
    """(the launcher, "") or (None, why not). $R1_SANDBOX_LAUNCHER wins; else build/r1-sandbox, (re)built from
    native/ when missing or older than its sources and `build` allows."""
    if os.environ.get(LAUNCHER_ENV):
        path = Path(os.environ[LAUNCHER_ENV])
        return (path, "") if os.access(path, os.X_OK) else (None, f"${LAUNCHER_ENV}={path} is not executable")
    if LAUNCHER.exists() and _fresh(LAUNCHER):
        return LAUNCHER, ""
    if build:
        try:
            return build_launcher(), ""
        except RuntimeError as err:
            if LAUNCHER.exists():
                return LAUNCHER, ""  # older than its sources, but it still isolates
            return None, str(err)
    return (LAUNCHER, "") if LAUNCHER.exists() else (None, f"{LAUNCHER} is not built")


def _prefix(executable: str) -> str | None:
    """The installation dir an executable needs inside the sandbox (.../bin/x -> ...), None under the system dirs."""
    real = os.path.realpath(executable)
    if real.startswith(SYSTEM_PREFIXES):
        return None
    return str(Path(real).parent.parent)


def python_candidates() -> list[str]:
    """Interpreters for Python programs, best first: this one (its base install, not the venv), then the system's."""
    found = [getattr(sys, "_base_executable", None) or sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    return list(dict.fromkeys(os.path.realpath(p) for p in found if os.access(p, os.X_OK)))


def find_cxx() -> str | None:
    """The C++ compiler for C++ programs ($CXX, g++, clang++), as a real path."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return os.path.realpath(shutil.which(name))
    return None


PROBE = "import sys; print('ok' if sys.version_info >= (3, 9) else 'too old')"  # what the judge's harness needs


@functools.cache
def get_sandbox(build: bool = True, isolations: tuple[str, ...] = ("namespaces", "seccomp"),
                launcher: str | None = None) -> Sandbox:
    """The best sandbox this machine gives, probed once per process by running a Python program under it: the first
    of `isolations` that works, with the first interpreter that runs there. launcher: another launcher binary."""
    path, why = (Path(launcher), "") if launcher else find_launcher(build)
    pythons = python_candidates()
    if path is not None:
        cxx = find_cxx()
        attempts = []
        for python in pythons:
            binds = tuple(dict.fromkeys(p for p in (_prefix(python), cxx and _prefix(cxx)) if p))
            for isolation in isolations:
                sandbox = Sandbox(str(path), isolation, "", python, binds)
                result = sandbox.run([python, "-I", "-S", "-c", PROBE], limits=Limits(wall_s=20))
                if result.ok and result.stdout.strip() == b"ok":
                    return dataclasses.replace(sandbox, detail=result.detail)
                attempts.append(f"{isolation} with {python}: {result.status} {result.note}".strip())
        why = f"{path} could not run Python here ({'; '.join(attempts)})"
    return Sandbox(None, "rlimits", why, pythons[0])


def describe(sandbox: Sandbox) -> str:
    if sandbox.launcher is None:
        return f"rlimits only (pure-Python fallback, NOT a sandbox): {sandbox.detail}"
    strength = "" if sandbox.contained else " (WEAK: no Landlock; your world-readable files are reachable)"
    return f"{sandbox.isolation} ({sandbox.detail}){strength} via {sandbox.launcher}"


def probe_launcher(launcher: str) -> dict[str, int]:
    """What this kernel offers the launcher (`r1-sandbox --probe`): landlock_abi, seccomp, root."""
    try:
        out = subprocess.run([launcher, "--probe"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    fields = dict(item.split("=", 1) for item in out.strip().split("\t") if "=" in item)
    return {k: int(v) for k, v in fields.items() if v.lstrip("-").isdigit()}


def protections(sandbox: Sandbox) -> list[str]:
    """Which of the judge's protections (docs/code_judge.md, "Guarantees per mode") this sandbox gives on this
    machine, one line each: "yes", "no" or what the real bound is."""
    if sandbox.launcher is None:
        return ["none: rlimits only (the tests of one program are separated by process group only)"]
    probe = probe_launcher(sandbox.launcher)
    abi, seccomp, root = probe.get("landlock_abi", 0), probe.get("seccomp", 0), probe.get("root", os.geteuid() == 0)
    ns = sandbox.isolation == "namespaces"
    yes = "yes" if seccomp else "NO (no seccomp filter for this architecture)"
    lines = [
        f"contained (files, network, processes): {'yes' if sandbox.contained else 'NO (seccomp without Landlock)'}",
        f"sockets other than AF_UNIX refused (AF_VSOCK included): {yes}"
        + ("" if ns else "; the fallback refuses socket() altogether"),
        "tests of one program share no process, input or file (the tree killed and the cwd emptied between tests; "
        "each test's input read only before its fork): yes ("
        + ("kill(-1) in the PID namespace" if ns else "the launcher kills the descendants") + ")",
        "a test cannot outlive its time limit (cancelling its timer does not help): yes",
        f"file signal owners (fcntl F_SETOWN/F_SETSIG/O_ASYNC, ioctl FIOSETOWN/SIOCSPGRP) refused: {yes}"
        + ("" if ns else f"; Landlock signal scoping: {'yes' if abi >= 6 else 'no (Landlock ABI < 6)'}"),
        "no reopening of the results through /proc/<pid>/fd: " + ("yes (no /proc)" if ns else
                                                                   "yes (the harness and the launcher non-dumpable)"),
        f"SysV IPC and POSIX message queues kept in: {'yes (IPC namespace)' if ns else yes + ' (refused)'}",
        "memfd_create refused (memory outside the address-space limit): " + yes,
    ]
    if ns:
        lines.append("processes: RLIMIT_NPROC per run (" + ("a uid of its own" if root else "a user namespace") + ")")
        lines.append("disk: the cwd is a tmpfs of work_mb (64 MB by default), the only writable place")
    else:
        cgroup = "+pids" in sandbox.detail
        lines.append("processes: " + ("pids.max per run (a child of $R1_SANDBOX_CGROUP)" if cgroup else
                                      "RLIMIT_NPROC per run (a uid of its own)" if root else
                     "RLIMIT_NPROC SHARED with every process of this uid: a fork bomb in one completion can make a "
                     "concurrent one fail (a false 0, never a false 1); set $R1_SANDBOX_CGROUP to a delegated cgroup "
                     "for a pids.max per run"))
        lines.append("disk: the cwd (on the host's disk) checked every 50 ms: past work_mb or 4096 entries the run is "
                     "killed (it may overshoot by what it writes in 50 ms; each file <= file_size_mb)")
        lines.append("stat/inotify outside the rules: stat not filtered (Landlock does not cover it), inotify and "
                     "fanotify refused")
    lines.append("memory: address space per process x processes (no cgroup); CPU time: per process x processes")
    if root:
        lines.append("per-run uid: 0x60000000 + the launcher's pid (unique among live launchers of this PID namespace; "
                     "leftovers of that uid killed first)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1_engine.engine.sandbox", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help=f"(re)compile the launcher into {LAUNCHER}")
    args = parser.parse_args(argv)
    # part of the README's set-up: never fails on a machine that merely lacks a compiler or the kernel features
    weak = "Code rewards then fall back to rlimits only, which the trainer refuses unless --reward.allow-unsandboxed-code"
    if args.build and not os.environ.get(LAUNCHER_ENV):
        try:
            print(f"r1-sandbox: built {build_launcher()} with {find_compiler()}", flush=True)
        except RuntimeError as err:
            print(f"r1-sandbox: WARNING: not built: {err}. {weak}.", file=sys.stderr, flush=True)
    try:
        sandbox = get_sandbox(build=False)
        print(f"r1-sandbox: isolation: {describe(sandbox)}")
        for line in protections(sandbox):
            print(f"r1-sandbox:   {line}")
        fallback = get_sandbox(build=False, isolations=("seccomp",))
        if sandbox.isolation == "namespaces" and fallback.launcher is not None:
            print(f"r1-sandbox: the fallback here (where namespaces are refused) would be: {describe(fallback)}")
            for line in protections(fallback):
                print(f"r1-sandbox:   {line}")
    except Exception as err:  # noqa: BLE001
        print(f"r1-sandbox: WARNING: the launcher could not be probed: {err}. {weak}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
