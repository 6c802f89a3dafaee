/* r1-sandbox: shared declarations of the launcher (sandbox.c), its setup pieces (sandbox_setup.c) and its kernel
 * filters (sandbox_filters.c). */
#ifndef R1_SANDBOX_H
#define R1_SANDBOX_H

#include <stddef.h>
#include <sys/types.h>

#define MAX_PATHS 32

/* A message to the launcher on the control pipe (one write, < PIPE_BUF: atomic). */
struct message {
    char tag; /* S: namespaces ready (value: init's pid), F: setup failed (text), E: exec failed (errno),
                 X: the program's wait status */
    int value;
    char text[200];
};

void send_message(int fd, char tag, int value, const char *fmt, ...);
int write_all(int fd, const char *buf, size_t n);
int write_text(const char *path, const char *text);

/* The namespaces' new root: a read-only tmpfs on `dir` with read-only binds of SYSTEM_PATHS and `binds`, DEVICE_PATHS
 * in /dev, a `work_mb` tmpfs at /work owned by uid/gid (the cwd; `copy_from`'s files copied in) and /tmp pointing
 * there; then pivot_root into it. On failure: an F message on `ctl` naming the step, and -1. */
struct root_spec {
    const char *dir, *copy_from;
    const char *const *binds;
    int n_binds;
    long work_mb;
};
int build_root(int ctl, const struct root_spec *spec, uid_t uid, gid_t gid);
int fail_step(int ctl, const char *step, const char *path);

/* Copy the regular files directly in `src` into `dst`, owned by uid/gid. */
int copy_files(const char *src, const char *dst, uid_t uid, gid_t gid);

/* Close every fd from 3 up except a, b and c. */
void keep_only(int a, int b, int c);

/* Tasks (threads included) of `uid` now: without a user namespace RLIMIT_NPROC counts all of them. */
long count_tasks(uid_t uid);

/* SIGKILL every live descendant of this process except `spare` (whose descendants are killed too; 0: none spared),
 * a walk over /proc's parent links; zombies are skipped. Returns how many were found. */
int kill_descendants(pid_t spare);

/* Whether the tree under `dir` holds more than max_bytes (allocated) or max_inodes entries, or is deeper than 32
 * levels (the seccomp fallback's stand-in for the namespaces' size-capped tmpfs, checked every 50 ms). */
int dir_over(const char *dir, long long max_bytes, long max_inodes);

/* Paths the program may read and execute (namespaces: bound read-only into the new root; fallback: Landlock rules). */
extern const char *const SYSTEM_PATHS[];

/* Devices bound into /dev (namespaces) or allowed read-write (Landlock). */
extern const char *const DEVICE_PATHS[];

/* The seccomp filter. Always: no ptrace or process_vm_*, no new namespaces, no mounts, no keyrings, no
 * bpf/perf/userfaultfd/io_uring (io_uring would bypass the filter). `fallback` (no PID and network namespaces) adds:
 * no sockets (socketpair stays), no connect/bind/listen/accept, no sendto with an address, no sendmsg, no signals
 * except to the own process group (kill(0, sig)), no SysV IPC or POSIX message queues, no inotify/fanotify.
 * Both also: socket/socketpair of AF_UNIX only, no memfd_create, no file signal owners (fcntl F_SETOWN[_EX],
 * F_SETSIG, O_ASYNC; ioctl FIOSETOWN, SIOCSPGRP, FIOASYNC). 0, or -errno (-ENOSYS: no filter for this
 * architecture). */
int install_seccomp(int fallback);

/* Whether install_seccomp has a filter for this architecture (x86-64, arm64). */
int seccomp_supported(void);

/* Landlock: read/execute under `read_paths`, read/write on DEVICE_PATHS, everything under `work_dir`, nothing else;
 * also no TCP bind/connect (ABI >= 4) and no signals or abstract unix sockets beyond the domain (ABI >= 6).
 * Returns the ABI version used (> 0), 0 when the kernel has no Landlock, or -errno on failure. */
int install_landlock(const char *const *read_paths, int n_read, const char *work_dir);

/* The Landlock ABI version of this kernel (0: none), capped by $R1_SANDBOX_LANDLOCK_ABI_MAX when set (tests use it
 * to run the fallback as on an older kernel; it can only weaken the sandbox, never strengthen it). */
#define LANDLOCK_CAP_ENV "R1_SANDBOX_LANDLOCK_ABI_MAX"
int landlock_abi(void);

#endif
