/* r1-sandbox's kernel filters for the fallback (no namespaces): a seccomp filter and a Landlock ruleset.
 *
 * Constants are spelled out here (they are kernel ABI, stable) so the build needs no recent kernel headers. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sandbox.h"

/* ------------------------------------------------------------------------------------------------ seccomp */
#if __has_include(<linux/seccomp.h>) && __has_include(<linux/filter.h>) && __has_include(<linux/audit.h>)
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#if defined(__x86_64__)
#define R1_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define R1_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

#endif /* without the kernel headers: no filter (namespaces still build; the fallback says it has no seccomp) */

#if defined(R1_AUDIT_ARCH) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define ARG_LO(n) ((uint32_t)(offsetof(struct seccomp_data, args) + 8 * (n)))
#define ARG_HI(n) (ARG_LO(n) + 4)
#define MAX_FILTER 256

struct filter {
    struct sock_filter code[MAX_FILTER];
    unsigned short n;
};

static void emit(struct filter *f, struct sock_filter insn) {
    if (f->n < MAX_FILTER) f->code[f->n++] = insn;
}

#define LOAD(off) emit(f, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (off)))
#define RET(v) emit(f, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, (v)))
#define JEQ(k, jt, jf) emit(f, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (k), (jt), (jf)))
#define JSET(k, jt, jf) emit(f, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, (k), (jt), (jf)))
#define NR_OFFSET ((uint32_t)offsetof(struct seccomp_data, nr))
#define AF_UNIX_NR 1u
#define F_SETOWN_NR 8u
#define F_SETSIG_NR 10u
#define F_SETOWN_EX_NR 15u
#define O_ASYNC_NR 020000u
#define FIOSETOWN_NR 0x8901u
#define SIOCSPGRP_NR 0x8902u
#define FIOASYNC_NR 0x5452u

/* The syscall `nr` fails with `err` (the accumulator holds the syscall number). */
static void deny(struct filter *f, long nr, int err) {
    JEQ((uint32_t)nr, 0, 1);
    RET(SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA));
}

/* socket(domain, ...) / socketpair(domain, ...): AF_UNIX only (AF_VSOCK and friends ignore network namespaces). */
static void unix_only(struct filter *f, long nr) {
    JEQ((uint32_t)nr, 0, 4);
    LOAD(ARG_LO(0));
    JEQ(AF_UNIX_NR, 0, 1);
    RET(SECCOMP_RET_ALLOW);
    RET(SECCOMP_RET_ERRNO | EAFNOSUPPORT);
}

int install_seccomp(int fallback) {
    struct filter filter = {.n = 0}, *f = &filter;
    LOAD((uint32_t)offsetof(struct seccomp_data, arch));
    JEQ(R1_AUDIT_ARCH, 1, 0);
    RET(SECCOMP_RET_KILL_PROCESS); /* another ABI (i386 int 0x80) would have other syscall numbers */
    LOAD(NR_OFFSET);
#ifdef __x86_64__
    emit(f, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1)); /* x32 */
    RET(SECCOMP_RET_KILL_PROCESS);
#endif
    /* both: sockets of AF_UNIX only (namespaces: no host socket is reachable through the mount and network
     * namespaces, but AF_VSOCK and others are not namespaced); the fallback denies socket() altogether below */
    unix_only(f, SYS_socketpair);
    if (!fallback) unix_only(f, SYS_socket);
    /* both: no signal owner for a file (F_SETOWN[_EX], FIOSETOWN, SIOCSPGRP would let SIGIO / F_SETSIG's signal
     * reach any process of the uid, bypassing the kill() rule), no F_SETSIG, no O_ASYNC */
    JEQ(SYS_fcntl, 0, 9);
    LOAD(ARG_LO(1));
    JEQ(F_SETOWN_NR, 6, 0);
    JEQ(F_SETOWN_EX_NR, 5, 0);
    JEQ(F_SETSIG_NR, 4, 0);
    JEQ(F_SETFL, 0, 2);
    LOAD(ARG_LO(2));
    JSET(O_ASYNC_NR, 1, 0);
    RET(SECCOMP_RET_ALLOW);
    RET(SECCOMP_RET_ERRNO | EPERM);
    JEQ(SYS_ioctl, 0, 6);
    LOAD(ARG_LO(1));
    JEQ(FIOSETOWN_NR, 3, 0);
    JEQ(SIOCSPGRP_NR, 2, 0);
    JEQ(FIOASYNC_NR, 1, 0);
    RET(SECCOMP_RET_ALLOW);
    RET(SECCOMP_RET_ERRNO | EPERM);
    if (fallback) { /* without a PID and network namespace: signals and sockets are the host's */
        /* kill(pid, sig): only pid 0 (the own process group) */
        JEQ(SYS_kill, 0, 4);
        LOAD(ARG_LO(0));
        JEQ(0, 0, 1);
        RET(SECCOMP_RET_ALLOW);
        RET(SECCOMP_RET_ERRNO | EPERM);
        /* sendto(fd, buf, len, flags, addr, addrlen): only without an address (send() on a socketpair) */
        JEQ(SYS_sendto, 0, 6);
        LOAD(ARG_LO(4));
        JEQ(0, 0, 3);
        LOAD(ARG_HI(4));
        JEQ(0, 0, 1);
        RET(SECCOMP_RET_ALLOW);
        RET(SECCOMP_RET_ERRNO | EPERM);
        static const long host[] = {SYS_socket, SYS_connect, SYS_bind, SYS_listen, SYS_accept, SYS_accept4,
                                    SYS_sendmsg, SYS_sendmmsg, SYS_tkill, SYS_tgkill, SYS_rt_sigqueueinfo,
                                    SYS_rt_tgsigqueueinfo,
#ifdef SYS_pidfd_send_signal
                                    SYS_pidfd_send_signal,
#endif
                                    /* no IPC namespace: SysV IPC and POSIX message queues are the host's (and
                                     * outlive the run) */
                                    SYS_shmget, SYS_shmat, SYS_shmctl, SYS_msgget, SYS_msgsnd, SYS_msgrcv,
                                    SYS_msgctl, SYS_semget, SYS_semop, SYS_semctl, SYS_semtimedop, SYS_mq_open,
                                    SYS_mq_unlink,
                                    /* watching the host's files (Landlock does not cover inotify/fanotify) */
#ifdef SYS_inotify_init
                                    SYS_inotify_init,
#endif
                                    SYS_inotify_init1, SYS_fanotify_init,
        };
        for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) deny(f, host[i], EPERM);
    }
    /* clone(flags, ...): no new namespaces */
    JEQ(SYS_clone, 0, 4);
    LOAD(ARG_LO(0));
    JSET(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP,
         1, 0);
    RET(SECCOMP_RET_ALLOW);
    RET(SECCOMP_RET_ERRNO | EPERM);
#ifdef SYS_clone3
    deny(f, SYS_clone3, ENOSYS); /* its flags sit in memory the filter cannot read; libc falls back to clone */
#endif
    /* both: no tracing (the harness's results), no new namespaces, mounts, keyrings (the user's keys), and less
     * kernel surface (bpf, perf, userfaultfd, io_uring: it would also bypass this filter) */
    static const long denied[] = {
        SYS_ptrace, SYS_process_vm_readv, SYS_process_vm_writev, SYS_unshare, SYS_setns, SYS_mount, SYS_umount2,
        SYS_pivot_root, SYS_chroot, SYS_bpf, SYS_perf_event_open, SYS_userfaultfd, SYS_add_key, SYS_request_key,
        SYS_keyctl, SYS_kexec_load, SYS_init_module, SYS_finit_module, SYS_delete_module,
        SYS_memfd_create, /* memory outside RLIMIT_AS and outside the work tmpfs' size */
#ifdef SYS_memfd_secret
        SYS_memfd_secret,
#endif
#ifdef SYS_io_uring_setup
        SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,
#endif
#ifdef SYS_pidfd_getfd
        SYS_pidfd_getfd,
#endif
#ifdef SYS_open_tree
        SYS_open_tree, SYS_move_mount, SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_fspick,
#endif
    };
    for (size_t i = 0; i < sizeof denied / sizeof denied[0]; i++) deny(f, denied[i], EPERM);
    RET(SECCOMP_RET_ALLOW);
    if (f->n >= MAX_FILTER) return -E2BIG;
    struct sock_fprog prog = {.len = f->n, .filter = f->code};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -errno;
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) return -errno;
    return 0;
}
int seccomp_supported(void) { return 1; }
#else
int seccomp_supported(void) { return 0; }
int install_seccomp(int fallback) {
    (void)fallback;
    return -ENOSYS;
} /* no filter for this architecture: the launcher says so */
#endif

/* ------------------------------------------------------------------------------------------------ Landlock */
#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif
#define LL_CREATE_RULESET_VERSION 1u
#define LL_RULE_PATH_BENEATH 1
#define LL_EXECUTE (1ull << 0)
#define LL_WRITE_FILE (1ull << 1)
#define LL_READ_FILE (1ull << 2)
#define LL_READ_DIR (1ull << 3)
#define LL_TRUNCATE (1ull << 14)
#define LL_IOCTL_DEV (1ull << 15)
#define LL_NET_BIND_TCP (1ull << 0)
#define LL_NET_CONNECT_TCP (1ull << 1)
#define LL_SCOPE_ABSTRACT_UNIX (1ull << 0)
#define LL_SCOPE_SIGNAL (1ull << 1)

struct ll_ruleset_attr {
    uint64_t handled_access_fs, handled_access_net, scoped;
};
struct ll_path_beneath {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

int landlock_abi(void) {
    long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, LL_CREATE_RULESET_VERSION);
    const char *cap = getenv(LANDLOCK_CAP_ENV); /* tests: behave like an older kernel (0: none) */
    if (abi > 0 && cap && *cap >= '0' && *cap <= '9' && atol(cap) < abi) abi = atol(cap);
    return abi > 0 ? (int)abi : 0;
}

/* Allow `access` (restricted to what a file rule may hold when `path` is not a directory) beneath `path`. */
static int allow(int ruleset, const char *path, uint64_t access) {
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 0 : -errno;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    if (!S_ISDIR(st.st_mode)) access &= LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV;
    struct ll_path_beneath rule = {.allowed_access = access, .parent_fd = fd};
    int rc = (int)syscall(SYS_landlock_add_rule, ruleset, LL_RULE_PATH_BENEATH, &rule, 0);
    int err = errno;
    close(fd);
    return rc == 0 ? 0 : -err;
}

int install_landlock(const char *const *read_paths, int n_read, const char *work_dir) {
    int abi = landlock_abi();
    if (abi == 0) return 0;
    uint64_t fs = (1ull << 13) - 1; /* ABI 1: execute .. make_sym */
    if (abi >= 2) fs |= 1ull << 13; /* refer */
    if (abi >= 3) fs |= LL_TRUNCATE;
    if (abi >= 5) fs |= LL_IOCTL_DEV;
    struct ll_ruleset_attr attr = {.handled_access_fs = fs};
    size_t size = sizeof attr.handled_access_fs;
    if (abi >= 4) {
        attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP; /* handled, never allowed */
        size += sizeof attr.handled_access_net;
    }
    if (abi >= 6) {
        attr.scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL;
        size += sizeof attr.scoped;
    }
    int ruleset = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    if (ruleset < 0) return -errno;
    int rc = 0;
    for (int i = 0; i < n_read && rc == 0; i++) rc = allow(ruleset, read_paths[i], LL_EXECUTE | LL_READ_FILE | LL_READ_DIR);
    for (int i = 0; DEVICE_PATHS[i] && rc == 0; i++)
        rc = allow(ruleset, DEVICE_PATHS[i], fs & (LL_READ_FILE | LL_WRITE_FILE | LL_TRUNCATE | LL_IOCTL_DEV));
    if (rc == 0) rc = allow(ruleset, work_dir, fs);
    if (rc == 0 && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) rc = -errno;
    if (rc == 0 && syscall(SYS_landlock_restrict_self, ruleset, 0) != 0) rc = -errno;
    close(ruleset);
    return rc == 0 ? abi : rc;
}
