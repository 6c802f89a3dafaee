/* r1-sandbox: run one untrusted program (a policy's code under RL) so that it cannot reach the network, other
 * processes or files outside a throwaway directory, and cannot outlive its wall-clock limit.
 *
 *   r1-sandbox --dir EMPTY_DIR [--copy SRC_DIR] [--wall S] [--cpu S] [--mem MB] [--nproc N] [--fsize MB]
 *              [--nofile N] [--work-mb MB] [--out-cap BYTES] [--bind PATH]... [--env K=V]... [--report FD]
 *              [--isolation auto|namespaces|seccomp] -- PROGRAM [ARGS...]
 *   r1-sandbox --probe        (prints landlock_abi=N, seccomp=0|1, root=0|1: what this kernel offers the fallback)
 *   $R1_SANDBOX_LANDLOCK_ABI_MAX=N caps the Landlock ABI used (tests: run as on an older kernel; 0: no Landlock)
 *   $R1_SANDBOX_CGROUP=DIR (fallback): a cgroup this user may write (v2 with the pids controller delegated, or a v1
 *   pids hierarchy); each run gets a child cgroup with pids.max = --nproc + 3 instead of the uid-wide RLIMIT_NPROC
 *
 * namespaces (preferred): fresh user (unless root), PID, network (no interface up, loopback included), mount, IPC
 * and UTS namespaces. The new root is a read-only tmpfs built on --dir holding read-only binds of the system
 * directories, /etc/ld.so.cache, the --bind paths and a few devices; the program's cwd is /work, a size-capped tmpfs
 * (and /tmp points there): the only writable place, gone with the run. No /proc. A tiny init (pid 1) waits for the
 * program; when the program exits or the wall clock runs out, init dies and the kernel kills every process left.
 * seccomp (fallback when namespaces are refused): --dir itself is the cwd, killed when it passes --work-mb or 4096
 * entries (checked every 50 ms); a seccomp filter (no sockets, no signals beyond the own process group, no ptrace,
 * no SysV IPC or message queues, no inotify) and, when the kernel has it, Landlock (reads limited to the system
 * paths, writes to --dir); the launcher becomes a child subreaper and kills what is left, orphans included. The
 * program gets a reap channel ($R1_SANDBOX_REAP_FD): one byte written there makes the launcher kill every other
 * process of the run, then answer one byte (the judge's harness: between tests).
 * Both: sockets of AF_UNIX only, no memfd, no file signal owners (seccomp); the launcher is not dumpable (nobody
 * reopens its stdout through /proc); $R1_SANDBOX_ISOLATION tells the program which isolation it got.
 * Started as root, the program runs as its own unprivileged uid (0x60000000 + the launcher's pid). No new
 * privileges; an environment of PATH, HOME, TMPDIR, LANG and the --env pairs only; rlimits CPU, AS, NPROC, FSIZE,
 * NOFILE with soft = hard (the program cannot raise them); stdout and stderr forwarded up to --out-cap bytes each,
 * the rest read and dropped. The result goes to --report FD (else stderr) as one line of tab-separated key=value
 * fields: isolation, detail, status (exited|signaled|timeout|disk_limit|exec_failed|setup_failed), exit_code,
 * signal, wall_ms, stdout_bytes, stdout_truncated, stderr_bytes, stderr_truncated, note. Exit code: 0, or 125 for
 * bad usage. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "sandbox.h"

/* root: each run's own uid, BASE + the launcher's pid (NPROC and kill(-1) count per uid). pid_max is at most 2^22,
 * so two launchers alive at once in one PID namespace never share a uid; a later run that gets a recycled pid
 * gets the same uid, which is why the launcher first kills whatever still runs as it. */
#define SANDBOX_UID_BASE 0x60000000u
#define NS_UID 1000 /* the program's uid and gid inside a user namespace */
#define WORK_INODES 4096 /* entries in the work directory (namespaces: the tmpfs's nr_inodes) */
#define DISK_CHECK_S 0.05 /* fallback: how often the work directory's size is checked */
#define CGROUP_ENV "R1_SANDBOX_CGROUP" /* fallback: a delegated cgroup to make each run's own cgroup in */
#define EXIT_USAGE 125

enum isolation { ISO_AUTO, ISO_NAMESPACES, ISO_SECCOMP };

static struct options {
    const char *dir, *copy_from;
    enum isolation isolation;
    double wall_s;
    long cpu_s, mem_mb, nproc, fsize_mb, nofile, work_mb, out_cap;
    const char *binds[MAX_PATHS];
    int n_binds;
    const char *env[MAX_PATHS];
    int n_env;
    int report_fd;
    char **argv;
} opt = {.isolation = ISO_AUTO, .wall_s = 10, .cpu_s = 10, .mem_mb = 1024, .nproc = 64, .fsize_mb = 16,
         .nofile = 64, .work_mb = 64, .out_cap = 1 << 20, .report_fd = -1};

static volatile sig_atomic_t stop_requested;
static int is_root;
static uid_t sandbox_uid; /* root: the uid the program runs as */
static int program_reap_fd = -1; /* fallback: the program's end of the reap channel (see run_fallback) */
static char run_cgroup[PATH_MAX];  /* fallback with $R1_SANDBOX_CGROUP: this run's own cgroup ("": none) */

/* ------------------------------------------------------------------------------------------------ helpers */
static void die_usage(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("r1-sandbox: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputs("\n", stderr);
    va_end(ap);
    exit(EXIT_USAGE);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ------------------------------------------------------------------------------------------------ the program */
static void set_limit(int resource, rlim_t value) {
    struct rlimit r = {value, value};
    setrlimit(resource, &r);
}

/* In the program's process: limits, identity, filters, a clean environment, then exec. Never returns. */
static void exec_program(int ctl, int out_w, int err_w, int namespaces) {
    const char *step = "dup2", *cwd = namespaces ? "/work" : opt.dir;
    if (dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0) goto fail;
    step = "setsid";
    if (!namespaces && setsid() < 0) goto fail;
    step = "chdir";
    if (chdir(cwd) != 0) goto fail;
    set_limit(RLIMIT_CPU, (rlim_t)opt.cpu_s);
    set_limit(RLIMIT_AS, (rlim_t)opt.mem_mb << 20);
    set_limit(RLIMIT_FSIZE, (rlim_t)opt.fsize_mb << 20);
    set_limit(RLIMIT_NOFILE, (rlim_t)opt.nofile);
    set_limit(RLIMIT_CORE, 0);
    long nproc = opt.nproc + 3; /* the launcher's setup process and init count in a user namespace */
    if (!namespaces && !is_root) nproc += count_tasks(getuid());
    struct rlimit user_max;
    if (run_cgroup[0]) { /* the cgroup's pids.max bounds the run; the uid-wide rlimit would let runs starve others */
        step = "cgroup";
        char procs[PATH_MAX + 16];
        snprintf(procs, sizeof procs, "%s/cgroup.procs", run_cgroup);
        if (write_text(procs, "0\n") != 0) goto fail;
        if (getrlimit(RLIMIT_NPROC, &user_max) == 0) nproc = user_max.rlim_max == RLIM_INFINITY ? -1 : (long)user_max.rlim_max;
    }
    set_limit(RLIMIT_NPROC, nproc < 0 ? RLIM_INFINITY : (rlim_t)nproc);
    for (int cap = 0; cap <= 63; cap++) prctl(PR_CAPBSET_DROP, cap, 0, 0, 0); /* no capability survives exec */
    step = "no_new_privs"; /* the filters go on first: as root, their paths can be opened whatever the modes */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) goto fail;
    if (!namespaces) {
        step = "landlock";
        const char *paths[MAX_PATHS * 2];
        int n = 0;
        for (int i = 0; SYSTEM_PATHS[i]; i++) paths[n++] = SYSTEM_PATHS[i];
        for (int i = 0; i < opt.n_binds; i++) paths[n++] = opt.binds[i];
        int abi = install_landlock(paths, n, opt.dir);
        if (abi < 0) {
            errno = -abi;
            goto fail;
        }
    }
    step = "seccomp";
    int rc = install_seccomp(!namespaces);
    if (rc != 0 && !(namespaces && rc == -ENOSYS)) { /* namespaces hold without it on other architectures */
        errno = -rc;
        goto fail;
    }
    step = "setuid";
    if (is_root) {
        if (setgroups(0, NULL) != 0 || setresgid(sandbox_uid, sandbox_uid, sandbox_uid) != 0 ||
            setresuid(sandbox_uid, sandbox_uid, sandbox_uid) != 0 || setuid(0) == 0)
            goto fail;
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* after the identity change, which clears it */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    clearenv();
    setenv("PATH", "/usr/local/bin:/usr/bin:/bin", 1);
    setenv("HOME", cwd, 1);
    setenv("TMPDIR", cwd, 1);
    setenv("LANG", "C.UTF-8", 1);
    setenv("R1_SANDBOX_ISOLATION", namespaces ? "namespaces" : "seccomp", 1); /* for the judge's harness */
    char reap[16];
    snprintf(reap, sizeof reap, "%d", program_reap_fd);
    if (program_reap_fd >= 0) setenv("R1_SANDBOX_REAP_FD", reap, 1);
    for (int i = 0; i < opt.n_env; i++) putenv((char *)opt.env[i]);
#ifdef SYS_close_range
    if (syscall(SYS_close_range, 3, ~0u, 4 /* CLOSE_RANGE_CLOEXEC */) != 0)
#endif
        for (int fd = 3; fd < 4096; fd++)
            if (fd != ctl) fcntl(fd, F_SETFD, FD_CLOEXEC);
    if (program_reap_fd >= 0) fcntl(program_reap_fd, F_SETFD, 0);
    step = "exec";
    execvp(opt.argv[0], opt.argv);
fail:
    send_message(ctl, 'E', errno, "%s %s: %s", step, strcmp(step, "exec") ? (strcmp(step, "chdir") ? "" : cwd)
                 : opt.argv[0], strerror(errno));
    _exit(127);
}

/* ------------------------------------------------------------------------------------------------ supervision */
struct stream {
    int fd, out_fd;
    long long seen;
    int truncated;
};

/* Forward what `s` has (up to the cap; the rest is read and dropped). Returns 0 at EOF. */
static int pump(struct stream *s) {
    char buf[65536];
    ssize_t n = read(s->fd, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return 1;
    if (n <= 0) {
        close(s->fd);
        s->fd = -1;
        return 0;
    }
    long long room = opt.out_cap - s->seen;
    if (room > 0) write_all(s->out_fd, buf, (size_t)(n < room ? n : room));
    s->seen += n;
    if (s->seen > opt.out_cap) s->truncated = 1;
    return 1;
}

struct run {
    struct stream out, err;
    int ctl;          /* read end of the control pipe */
    int reap;         /* fallback: the launcher's end of the reap channel (-1: none) */
    pid_t program;    /* fallback: the program (reaped by program_exited) */
    int pidfd;        /* fallback: the program's pidfd, to wake up when it exits (-1: poll with a tick) */
    int status_known, status, exec_errno, timed_out, setup_failed;
    int watch_disk, disk_over; /* fallback: --dir is checked against --work-mb every DISK_CHECK_S */
    double next_disk_check;
    pid_t init_pid;   /* namespaces: init as seen from here */
    char note[200];
};

static void on_message(struct run *r, const struct message *m) {
    if (m->tag == 'S') r->init_pid = m->value;
    if (m->tag == 'F') r->setup_failed = 1, snprintf(r->note, sizeof r->note, "%s", m->text);
    if (m->tag == 'E') r->exec_errno = m->value ? m->value : EINVAL, snprintf(r->note, sizeof r->note, "%s", m->text);
    if (m->tag == 'X') r->status_known = 1, r->status = m->value;
}

/* Wait on the streams, the control pipe and (fallback) the program until `done` says so or the deadline passes;
 * returns 0 on time, -1 at the deadline or on a stop request. */
static void reap_for_program(struct run *r);

static int wait_until(struct run *r, double deadline, int (*done)(struct run *)) {
    while (!done(r)) {
        if (stop_requested) return -1;
        double left = deadline - now_s();
        if (left <= 0) return -1;
        if (r->watch_disk && now_s() >= r->next_disk_check) {
            if (dir_over(opt.dir, (long long)opt.work_mb << 20, WORK_INODES)) {
                r->disk_over = 1;
                snprintf(r->note, sizeof r->note, "the work directory passed %ld MB or %d entries", opt.work_mb,
                         WORK_INODES);
                return -1;
            }
            r->next_disk_check = now_s() + DISK_CHECK_S;
        }
        struct pollfd fds[5];
        int n = 0;
        if (r->reap >= 0) fds[n++] = (struct pollfd){.fd = r->reap, .events = POLLIN};
        if (r->out.fd >= 0) fds[n++] = (struct pollfd){.fd = r->out.fd, .events = POLLIN};
        if (r->err.fd >= 0) fds[n++] = (struct pollfd){.fd = r->err.fd, .events = POLLIN};
        if (r->ctl >= 0) fds[n++] = (struct pollfd){.fd = r->ctl, .events = POLLIN};
        if (r->pidfd >= 0) fds[n++] = (struct pollfd){.fd = r->pidfd, .events = POLLIN};
        int timeout_ms = (int)(left * 1000) + 1;
        if (r->program > 0 && r->pidfd < 0 && timeout_ms > 20) timeout_ms = 20;
        if (r->watch_disk && timeout_ms > DISK_CHECK_S * 1000) timeout_ms = (int)(DISK_CHECK_S * 1000);
        if (poll(fds, n, timeout_ms) < 0 && errno != EINTR) return -1;
        for (int i = 0; i < n; i++) {
            if (!fds[i].revents) continue;
            if (fds[i].fd == r->reap) reap_for_program(r);
            else if (fds[i].fd == r->out.fd) pump(&r->out);
            else if (fds[i].fd == r->err.fd) pump(&r->err);
            else if (fds[i].fd == r->ctl) {
                struct message m;
                ssize_t got = read(r->ctl, &m, sizeof m);
                if (got == (ssize_t)sizeof m) on_message(r, &m);
                else if (got == 0 || (got < 0 && errno != EINTR)) close(r->ctl), r->ctl = -1;
            } /* a readable pidfd only wakes us: `done` reaps */
        }
    }
    return 0;
}

static int streams_closed(struct run *r) { return r->out.fd < 0 && r->err.fd < 0; }
static int ns_ready(struct run *r) { return r->init_pid > 0 || r->setup_failed || r->ctl < 0; }
static int ns_finished(struct run *r) { return (r->status_known || r->exec_errno || r->ctl < 0) && streams_closed(r); }
static int program_exited(struct run *r) {
    int status;
    if (!r->status_known && waitpid(r->program, &status, WNOHANG) == r->program) r->status_known = 1, r->status = status;
    return r->status_known || r->exec_errno;
}

static void setup_child(int ctl, int out_w, int err_w) {
    setsid();
    prctl(PR_SET_DUMPABLE, 1); /* its own /proc/self/uid_map must stay writable to it (it holds nothing secret) */
    int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (null >= 0) dup2(null, 1), dup2(null, 2); /* the program gets its own pipes; these are the caller's */
    keep_only(ctl, out_w, err_w);
    uid_t uid = geteuid();
    gid_t gid = getegid();
    char map[64];
    if (!is_root) { /* an unprivileged user namespace: the program is uid NS_UID there, without capabilities */
        if (unshare(CLONE_NEWUSER) != 0) _exit(fail_step(ctl, "unshare", "user") & 1);
        snprintf(map, sizeof map, "%d %d 1\n", NS_UID, (int)uid);
        if (write_text("/proc/self/setgroups", "deny") != 0 || write_text("/proc/self/uid_map", map) != 0)
            _exit(fail_step(ctl, "uid_map", NULL) & 1);
        snprintf(map, sizeof map, "%d %d 1\n", NS_UID, (int)gid);
        if (write_text("/proc/self/gid_map", map) != 0) _exit(fail_step(ctl, "gid_map", NULL) & 1);
        uid = gid = NS_UID;
    } else {
        uid = gid = sandbox_uid;
    }
    if (unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID) != 0)
        _exit(fail_step(ctl, "unshare", "net/pid/mount/ipc/uts") & 1);
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* after unshare(CLONE_NEWUSER), whose new credentials clear it */
    if (getppid() == 1) _exit(1);
    struct root_spec spec = {opt.dir, opt.copy_from, opt.binds, opt.n_binds, opt.work_mb};
    if (build_root(ctl, &spec, uid, gid) != 0) _exit(1);
    sethostname("sandbox", 7);
    pid_t init = fork();
    if (init < 0) _exit(fail_step(ctl, "fork", "init") & 1);
    if (init == 0) { /* pid 1: start the program, report its exit; when init exits the kernel kills the rest */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        pid_t program = fork();
        if (program == 0) exec_program(ctl, out_w, err_w, 1);
        close(out_w);
        close(err_w);
        int status;
        pid_t w;
        while ((w = waitpid(-1, &status, 0)) != program)
            if (w < 0 && errno != EINTR) _exit(1);
        send_message(ctl, 'X', status, NULL);
        _exit(0);
    }
    send_message(ctl, 'S', init, NULL);
    close(out_w);
    close(err_w);
    while (waitpid(init, NULL, 0) < 0 && errno == EINTR) {
    }
    _exit(0);
}

/* Fallback: kill the program's process group, every process of the run's uid (root), then every descendant (this
 * launcher is a child subreaper: orphans come back to it), until none is left. */
static void kill_tree(pid_t pgid) {
    if (pgid > 0) kill(-pgid, SIGKILL);
    if (is_root) {
        pid_t killer = fork();
        if (killer == 0) _exit(setresuid(sandbox_uid, sandbox_uid, sandbox_uid) == 0 ? kill(-1, SIGKILL) & 0 : 1);
        if (killer > 0) waitpid(killer, NULL, 0);
    }
    for (int round = 0; round < 200; round++) {
        int found = kill_descendants(0);
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
        if (!found && waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD) return;
        usleep(1000);
    }
}

/* Fallback: the program (the judge's harness) asked, on the reap channel, for every process it started to be killed
 * (a test's whole tree, setsid orphans included: seccomp lets it signal only its own process group). Kill every
 * live descendant of this launcher but the program itself, until none is left, then answer one byte. */
static void reap_for_program(struct run *r) {
    char byte;
    ssize_t got = read(r->reap, &byte, 1);
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (got <= 0) {
        close(r->reap);
        r->reap = -1;
        return;
    }
    for (int round = 0; round < 2000; round++) {
        int found = kill_descendants(r->program), status;
        pid_t w;
        while ((w = waitpid(-1, &status, WNOHANG)) > 0)
            if (w == r->program && !r->status_known) r->status_known = 1, r->status = status;
        if (!found) break;
        usleep(1000);
    }
    if (write(r->reap, "k", 1) != 1) close(r->reap), r->reap = -1;
}

/* ------------------------------------------------------------------------------------------------ main */
static long parse_long(const char *flag, const char *value, long low) {
    char *end;
    long v = strtol(value, &end, 10);
    if (*value == '\0' || *end != '\0' || v < low) die_usage("%s %s: expected an integer >= %ld", flag, value, low);
    return v;
}

static void parse_args(int argc, char **argv) {
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (i + 1 >= argc) die_usage("%s needs a value (usage: see the top of native/sandbox.c)", a);
        const char *v = argv[++i];
        if (strcmp(a, "--dir") == 0) opt.dir = v;
        else if (strcmp(a, "--copy") == 0) opt.copy_from = v;
        else if (strcmp(a, "--wall") == 0) {
            char *end;
            opt.wall_s = strtod(v, &end);
            if (*end != '\0' || !(opt.wall_s > 0)) die_usage("--wall %s: expected seconds > 0", v);
        } else if (strcmp(a, "--cpu") == 0) opt.cpu_s = parse_long(a, v, 1);
        else if (strcmp(a, "--mem") == 0) opt.mem_mb = parse_long(a, v, 16);
        else if (strcmp(a, "--nproc") == 0) opt.nproc = parse_long(a, v, 1);
        else if (strcmp(a, "--fsize") == 0) opt.fsize_mb = parse_long(a, v, 1);
        else if (strcmp(a, "--nofile") == 0) opt.nofile = parse_long(a, v, 8);
        else if (strcmp(a, "--work-mb") == 0) opt.work_mb = parse_long(a, v, 1);
        else if (strcmp(a, "--out-cap") == 0) opt.out_cap = parse_long(a, v, 0);
        else if (strcmp(a, "--report") == 0) opt.report_fd = (int)parse_long(a, v, 0);
        else if (strcmp(a, "--bind") == 0 && opt.n_binds < MAX_PATHS) {
            if (v[0] != '/') die_usage("--bind %s: expected an absolute path", v);
            opt.binds[opt.n_binds++] = v;
        } else if (strcmp(a, "--env") == 0 && opt.n_env < MAX_PATHS) {
            if (!strchr(v, '=')) die_usage("--env %s: expected KEY=VALUE", v);
            opt.env[opt.n_env++] = v;
        } else if (strcmp(a, "--isolation") == 0) {
            if (strcmp(v, "auto") == 0) opt.isolation = ISO_AUTO;
            else if (strcmp(v, "namespaces") == 0) opt.isolation = ISO_NAMESPACES;
            else if (strcmp(v, "seccomp") == 0) opt.isolation = ISO_SECCOMP;
            else die_usage("--isolation %s: expected auto, namespaces or seccomp", v);
        } else die_usage("unknown option %s (usage: see the top of native/sandbox.c)", a);
    }
    if (!opt.dir) die_usage("--dir DIR is required (an empty directory for this run)");
    if (i >= argc) die_usage("no program given after --");
    opt.argv = argv + i;
}

static void on_stop(int sig) {
    (void)sig;
    stop_requested = 1;
}

static void report(const char *isolation, const char *detail, struct run *r, double started) {
    const char *status = r->setup_failed ? "setup_failed"
                         : r->timed_out  ? "timeout"
                         : r->disk_over  ? "disk_limit"
                         : r->exec_errno ? "exec_failed"
                         : !r->status_known ? "setup_failed"
                         : WIFSIGNALED(r->status) ? "signaled" : "exited";
    for (char *c = r->note; *c; c++)
        if (*c == '\t' || *c == '\n') *c = ' ';
    long long out = r->out.seen < opt.out_cap ? r->out.seen : opt.out_cap;
    long long err = r->err.seen < opt.out_cap ? r->err.seen : opt.out_cap;
    dprintf(opt.report_fd >= 0 ? opt.report_fd : 2,
            "isolation=%s\tdetail=%s\tstatus=%s\texit_code=%d\tsignal=%d\twall_ms=%ld\tstdout_bytes=%lld\t"
            "stdout_truncated=%d\tstderr_bytes=%lld\tstderr_truncated=%d\tnote=%s\n",
            isolation, detail, status, r->status_known && WIFEXITED(r->status) ? WEXITSTATUS(r->status) : -1,
            r->status_known && WIFSIGNALED(r->status) ? WTERMSIG(r->status) : 0, (long)((now_s() - started) * 1000),
            out, r->out.truncated, err, r->err.truncated, r->note);
}

/* Pipes for stdout, stderr and control; returns the run with the read ends. */
static void open_pipes(struct run *r, int out_p[2], int err_p[2], int ctl_p[2]) {
    if (pipe2(out_p, O_CLOEXEC) || pipe2(err_p, O_CLOEXEC) || pipe2(ctl_p, O_CLOEXEC)) die_usage("pipe: %s", strerror(errno));
    *r = (struct run){.out = {.fd = out_p[0], .out_fd = 1}, .err = {.fd = err_p[0], .out_fd = 2}, .ctl = ctl_p[0],
                      .pidfd = -1, .reap = -1};
}

static int run_namespaces(struct run *r, double deadline) {
    int out_p[2], err_p[2], ctl_p[2];
    open_pipes(r, out_p, err_p, ctl_p);
    pid_t setup = fork();
    if (setup < 0) die_usage("fork: %s", strerror(errno));
    if (setup == 0) {
        close(out_p[0]), close(err_p[0]), close(ctl_p[0]);
        setup_child(ctl_p[1], out_p[1], err_p[1]);
    }
    close(out_p[1]), close(err_p[1]), close(ctl_p[1]);
    int on_time = wait_until(r, deadline, ns_ready) == 0;
    if (on_time && r->init_pid > 0) on_time = wait_until(r, deadline, ns_finished) == 0;
    if (!on_time && !r->status_known && !r->exec_errno) r->timed_out = 1;
    if (r->init_pid > 0) { /* init gone: the kernel kills the whole namespace; wait until it has (2 s at most) */
        int fd = -1;
#ifdef SYS_pidfd_open
        fd = (int)syscall(SYS_pidfd_open, r->init_pid, 0);
#endif
        kill(r->init_pid, SIGKILL);
        struct pollfd gone = {.fd = fd, .events = POLLIN};
        if (fd >= 0) poll(&gone, 1, 2000), close(fd);
    }
    kill(setup, SIGKILL);
    while (waitpid(setup, NULL, 0) < 0 && errno == EINTR) {
    }
    if (!r->init_pid && !r->setup_failed && !r->timed_out)
        r->setup_failed = 1, snprintf(r->note, sizeof r->note, "namespace setup exited early");
    return r->setup_failed ? -1 : 0;
}

static void run_fallback(struct run *r, double deadline) {
    int out_p[2], err_p[2], ctl_p[2];
    open_pipes(r, out_p, err_p, ctl_p);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    if (is_root && chown(opt.dir, sandbox_uid, sandbox_uid) != 0) die_usage("chown %s: %s", opt.dir, strerror(errno));
    if (opt.copy_from && copy_files(opt.copy_from, opt.dir, is_root ? sandbox_uid : getuid(),
                                    is_root ? sandbox_uid : getgid()) != 0)
        die_usage("copying %s into %s: %s", opt.copy_from, opt.dir, strerror(errno));
    int reap_p[2] = {-1, -1}; /* the program asks for its descendants to be killed (the harness: between tests) */
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, reap_p) != 0) reap_p[0] = reap_p[1] = -1;
    program_reap_fd = reap_p[1];
    pid_t program = fork();
    if (program < 0) die_usage("fork: %s", strerror(errno));
    if (program == 0) {
        close(out_p[0]), close(err_p[0]), close(ctl_p[0]);
        if (reap_p[0] >= 0) close(reap_p[0]);
        exec_program(ctl_p[1], out_p[1], err_p[1], 0);
    }
    close(out_p[1]), close(err_p[1]), close(ctl_p[1]);
    if (reap_p[1] >= 0) close(reap_p[1]);
    r->reap = reap_p[0];
    r->program = program;
#ifdef SYS_pidfd_open
    r->pidfd = (int)syscall(SYS_pidfd_open, program, 0);
#endif
    r->watch_disk = 1;
    if (wait_until(r, deadline, program_exited) != 0 && !program_exited(r) && !r->disk_over) r->timed_out = 1;
    r->watch_disk = 0;
    kill_tree(program);
    wait_until(r, (r->timed_out || r->disk_over ? now_s() : deadline) + 1.0, streams_closed); /* all dead: EOF */
    if (r->pidfd >= 0) close(r->pidfd);
    if (r->reap >= 0) close(r->reap);
}

/* Fallback with $R1_SANDBOX_CGROUP (a cgroup directory this user may write: cgroup v2 with the pids controller in
 * its subtree_control, or a cgroup v1 pids hierarchy): a child cgroup for this run with pids.max, so processes are
 * bounded per run even where the run has no uid of its own. Returns 0, or -1 with errno. */
static int make_run_cgroup(void) {
    const char *parent = getenv(CGROUP_ENV);
    if (!parent || !*parent) return 0;
    char path[PATH_MAX + 32], value[32];
    snprintf(run_cgroup, sizeof run_cgroup, "%s/r1-sandbox-%d", parent, (int)getpid());
    if (mkdir(run_cgroup, 0755) != 0 && errno != EEXIST) return run_cgroup[0] = '\0', -1;
    snprintf(path, sizeof path, "%s/pids.max", run_cgroup);
    snprintf(value, sizeof value, "%ld\n", opt.nproc + 3);
    if (write_text(path, value) != 0) {
        int err = errno;
        rmdir(run_cgroup);
        run_cgroup[0] = '\0';
        return errno = err, -1;
    }
    return 0;
}

static void remove_run_cgroup(void) {
    for (int i = 0; run_cgroup[0] && i < 200 && rmdir(run_cgroup) != 0 && errno == EBUSY; i++) usleep(5000);
}

/* Root: kill whatever still runs as this run's uid (left by an earlier run whose launcher had the same pid). */
static void kill_uid_leftovers(void) {
    pid_t killer = fork();
    if (killer == 0) _exit(setresuid(sandbox_uid, sandbox_uid, sandbox_uid) == 0 ? kill(-1, SIGKILL) & 0 : 1);
    if (killer > 0) waitpid(killer, NULL, 0);
}

int main(int argc, char **argv) {
    double started = now_s();
    if (argc == 2 && strcmp(argv[1], "--probe") == 0) { /* what this kernel offers the fallback */
        printf("landlock_abi=%d\tseccomp=%d\troot=%d\n", landlock_abi(), seccomp_supported(), geteuid() == 0);
        return 0;
    }
    parse_args(argc, argv);
    /* nobody of the program's uid may open this process's files through /proc/<pid>/fd (its stdout and the report
     * are the judge's results) or read its memory; also what a fork of it holds before exec */
    prctl(PR_SET_DUMPABLE, 0);
    is_root = geteuid() == 0;
    sandbox_uid = SANDBOX_UID_BASE + (uid_t)getpid();
    if (is_root) kill_uid_leftovers();
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* the caller died: clean up like on a timeout */
    struct sigaction sa = {.sa_handler = on_stop};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    double deadline = started + opt.wall_s;
    struct run r;
    char why[260] = "";
    if (opt.isolation != ISO_SECCOMP) {
        if (run_namespaces(&r, deadline) == 0) {
            char detail[64];
            snprintf(detail, sizeof detail, "%spid,net,mount,ipc,uts%s%s", is_root ? "" : "user,", is_root ? ",uid" : "",
                     seccomp_supported() ? ",seccomp" : "");
            report("namespaces", detail, &r, started);
            return 0;
        }
        if (opt.isolation == ISO_NAMESPACES) {
            report("namespaces", "refused", &r, started);
            return 0;
        }
        snprintf(why, sizeof why, "namespaces refused (%s)", r.note);
    }
    int abi = landlock_abi();
    char detail[64], ll[24] = "";
    if (abi > 0) snprintf(ll, sizeof ll, "+landlock%d", abi);
    if (make_run_cgroup() != 0) die_usage("$%s: cannot make a cgroup for this run: %s", CGROUP_ENV, strerror(errno));
    snprintf(detail, sizeof detail, "seccomp%s%s%s", ll, is_root ? "+uid" : "", run_cgroup[0] ? "+pids" : "");
    run_fallback(&r, deadline);
    remove_run_cgroup();
    if (why[0] && !r.note[0]) snprintf(r.note, sizeof r.note, "%s", why);
    report("seccomp", detail, &r, started);
    return 0;
}
