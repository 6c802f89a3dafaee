/* r1-sandbox's setup pieces: the control messages, the namespaces' new root, file copies and the /proc walks of the
 * seccomp fallback (sandbox.c drives them; declarations and what each does: sandbox.h). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sandbox.h"

const char *const SYSTEM_PATHS[] = {"/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                                    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
                                    NULL};
const char *const DEVICE_PATHS[] = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", NULL};

void send_message(int fd, char tag, int value, const char *fmt, ...) {
    struct message m = {.tag = tag, .value = value};
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(m.text, sizeof m.text, fmt, ap);
        va_end(ap);
    }
    ssize_t rc;
    do rc = write(fd, &m, sizeof m);
    while (rc < 0 && errno == EINTR);
}

int write_all(int fd, const char *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

int write_text(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = write_all(fd, text, strlen(text));
    close(fd);
    return rc;
}

static int mkdir_p(const char *path, mode_t mode) {
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return errno = ENAMETOOLONG, -1;
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, mode) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(buf, mode) != 0 && errno != EEXIST ? -1 : 0;
}

/* Copy the regular files directly in `src` into `dst` (mode 0755 if executable, else 0644), owned by uid/gid. */
int copy_files(const char *src, const char *dst, uid_t uid, gid_t gid) {
    DIR *d = opendir(src);
    if (!d) return -1;
    struct dirent *e;
    int rc = 0;
    char from[PATH_MAX], to[PATH_MAX], buf[65536];
    while (rc == 0 && (e = readdir(d))) {
        struct stat st;
        snprintf(from, sizeof from, "%s/%s", src, e->d_name);
        snprintf(to, sizeof to, "%s/%s", dst, e->d_name);
        if (lstat(from, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        int in = open(from, O_RDONLY | O_CLOEXEC);
        int out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, (st.st_mode & 0111) ? 0755 : 0644);
        ssize_t n = 0;
        if (in < 0 || out < 0) rc = -1;
        while (rc == 0 && (n = read(in, buf, sizeof buf)) > 0) rc = write_all(out, buf, (size_t)n);
        if (n < 0 || (out >= 0 && fchown(out, uid, gid) != 0)) rc = -1;
        if (in >= 0) close(in);
        if (out >= 0) close(out);
    }
    closedir(d);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ the new root */
int fail_step(int ctl, const char *step, const char *path) {
    send_message(ctl, 'F', errno, "%s %s: %s", step, path ? path : "", strerror(errno));
    return -1;
}

/* Bind `src` read-only at `root`/`src` (a symlink is recreated as such); `src` missing is not an error. */
static int bind_into(int ctl, const char *root, const char *src, int device) {
    struct stat st;
    char dst[PATH_MAX], target[PATH_MAX];
    if (lstat(src, &st) != 0) return 0;
    snprintf(dst, sizeof dst, "%s%s", root, src);
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", dst);
    *strrchr(parent, '/') = '\0';
    if (mkdir_p(parent, 0755) != 0) return fail_step(ctl, "mkdir", parent);
    if (S_ISLNK(st.st_mode)) {
        ssize_t n = readlink(src, target, sizeof target - 1);
        if (n < 0) return fail_step(ctl, "readlink", src);
        target[n] = '\0';
        return symlink(target, dst) == 0 || errno == EEXIST ? 0 : fail_step(ctl, "symlink", dst);
    }
    if (S_ISDIR(st.st_mode)) {
        if (mkdir(dst, 0755) != 0 && errno != EEXIST) return fail_step(ctl, "mkdir", dst);
    } else {
        int fd = open(dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) return fail_step(ctl, "create", dst);
        close(fd);
    }
    if (mount(src, dst, NULL, MS_BIND, NULL) != 0) return fail_step(ctl, "bind", src);
    /* read-only, keeping the flags the source mount has locked (a user namespace may not clear them) */
    struct statvfs vfs;
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (device ? MS_NOEXEC : MS_RDONLY | MS_NODEV);
    if (statvfs(src, &vfs) == 0) {
        if (vfs.f_flag & ST_NOEXEC) flags |= MS_NOEXEC;
        if (vfs.f_flag & ST_NODEV) flags |= MS_NODEV;
        if (vfs.f_flag & ST_NOATIME) flags |= MS_NOATIME;
        if (vfs.f_flag & ST_NODIRATIME) flags |= MS_NODIRATIME;
        if (vfs.f_flag & ST_RELATIME) flags |= MS_RELATIME;
        if (vfs.f_flag & ST_RDONLY) flags |= MS_RDONLY;
    }
    return mount(NULL, dst, NULL, flags, NULL) == 0 ? 0 : fail_step(ctl, "remount", dst);
}

int build_root(int ctl, const struct root_spec *spec, uid_t uid, gid_t gid) {
    const char *root = spec->dir;
    char path[PATH_MAX], options[128];
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) return fail_step(ctl, "make-private", "/");
    if (mount("r1-root", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755") != 0)
        return fail_step(ctl, "mount-tmpfs", root);
    for (int i = 0; SYSTEM_PATHS[i]; i++)
        if (bind_into(ctl, root, SYSTEM_PATHS[i], 0) != 0) return -1;
    for (int i = 0; i < spec->n_binds; i++)
        if (bind_into(ctl, root, spec->binds[i], 0) != 0) return -1;
    snprintf(path, sizeof path, "%s/dev", root);
    if (mkdir(path, 0755) != 0 || mount("r1-dev", path, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755") != 0)
        return fail_step(ctl, "mount-dev", path);
    for (int i = 0; DEVICE_PATHS[i]; i++)
        if (bind_into(ctl, root, DEVICE_PATHS[i], 1) != 0) return -1;
    snprintf(path, sizeof path, "%s/work", root);
    snprintf(options, sizeof options, "size=%ldm,nr_inodes=4096,mode=0700", spec->work_mb);
    if (mkdir(path, 0700) != 0 || mount("r1-work", path, "tmpfs", MS_NOSUID | MS_NODEV, options) != 0)
        return fail_step(ctl, "mount-work", path);
    if (chown(path, uid, gid) != 0) return fail_step(ctl, "chown", path);
    if (spec->copy_from && copy_files(spec->copy_from, path, uid, gid) != 0) return fail_step(ctl, "copy", spec->copy_from);
    snprintf(path, sizeof path, "%s/tmp", root);
    if (symlink("/work", path) != 0 && errno != EEXIST) return fail_step(ctl, "symlink", path);
    if (mount(NULL, root, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0)
        return fail_step(ctl, "remount-ro", root);
    if (chdir(root) != 0 || syscall(SYS_pivot_root, ".", ".") != 0) return fail_step(ctl, "pivot_root", root);
    if (umount2(".", MNT_DETACH) != 0 || chdir("/") != 0) return fail_step(ctl, "detach-old-root", NULL);
    return 0;
}

/* Tasks (threads included) of `uid` now: without a user namespace RLIMIT_NPROC counts all of them. */
long count_tasks(uid_t uid) {
    DIR *proc = opendir("/proc");
    if (!proc) return 0;
    long n = 0;
    struct dirent *e;
    char path[300];
    while ((e = readdir(proc))) {
        struct stat st;
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        snprintf(path, sizeof path, "/proc/%s/task", e->d_name);
        if (stat(path, &st) != 0 || st.st_uid != uid) continue;
        DIR *tasks = opendir(path);
        if (!tasks) continue;
        struct dirent *t;
        while ((t = readdir(tasks))) n += t->d_name[0] != '.';
        closedir(tasks);
    }
    closedir(proc);
    return n;
}

/* Close every fd from 3 up except the three given (the setup process and init keep nothing of the caller's: the
 * caller reads its pipes to EOF). */
void keep_only(int a, int b, int c) {
    int keep[3] = {a, b, c}, next = 3;
    for (int i = 0; i < 3; i++) /* sort the three */
        for (int j = i + 1; j < 3; j++)
            if (keep[j] < keep[i]) {
                int t = keep[i];
                keep[i] = keep[j], keep[j] = t;
            }
    struct rlimit lim;
    unsigned top = getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < 65536 ? (unsigned)lim.rlim_cur : 65536;
    for (int i = 0; i <= 3; i++) {
        unsigned last = i < 3 ? (unsigned)keep[i] - 1 : ~0u;
        if ((unsigned)next <= last) {
#ifdef SYS_close_range
            if (syscall(SYS_close_range, next, last, 0) != 0)
#endif
                for (unsigned fd = (unsigned)next; fd <= last && fd < top; fd++) close((int)fd);
        }
        if (i < 3) next = keep[i] + 1;
    }
}

/* SIGKILL every live descendant of this process but `spare` (a walk over /proc's parent links); returns how many. */
int kill_descendants(pid_t spare) {
    size_t cap = 4096, n = 0;
    pid_t (*links)[2] = malloc(cap * sizeof *links); /* (pid, parent) */
    DIR *proc = opendir("/proc");
    struct dirent *e;
    char path[300], line[512];
    while (links && proc && (e = readdir(proc))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC), parent;
        char state;
        ssize_t got = fd < 0 ? -1 : read(fd, line, sizeof line - 1);
        if (fd >= 0) close(fd);
        if (got <= 0) continue;
        line[got] = '\0';
        char *tail = strrchr(line, ')'); /* the command name may hold spaces and parentheses */
        if (!tail || sscanf(tail + 1, " %c %d", &state, &parent) != 2) continue;
        if (state == 'Z' || state == 'X') parent = -1; /* dead: nothing to kill (its parent reaps it) */
        if (n == cap) {
            void *grown = realloc(links, 2 * cap * sizeof *links);
            if (!grown) break;
            links = grown, cap *= 2;
        }
        links[n][0] = atoi(e->d_name), links[n][1] = parent, n++;
    }
    if (proc) closedir(proc);
    int found = 0;
    pid_t *queue = links ? malloc((n + 1) * sizeof *queue) : NULL;
    if (queue) {
        size_t head = 0, tail = 0;
        queue[tail++] = getpid();
        while (head < tail) {
            pid_t p = queue[head++];
            for (size_t i = 0; i < n; i++)
                if (links[i][1] == p && links[i][0] != p && tail <= n) {
                    queue[tail++] = links[i][0];
                    if (links[i][0] == spare) continue;
                    kill(links[i][0], SIGKILL);
                    found++;
                }
        }
    }
    free(queue);
    free(links);
    return found;
}

/* Add what lies under the directory `fd` (closed here) to *bytes (allocated blocks) and *inodes, without following
 * symlinks; a subdirectory the program made unreadable is made readable again (its owner may). Returns -1 when the
 * tree is deeper than `depth` levels (a hostile program hiding files from the count), else 0. */
static int usage_at(int fd, long long *bytes, long *inodes, int depth) {
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return 0;
    }
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        *bytes += (long long)st.st_blocks * 512;
        (*inodes)++;
        if (!S_ISDIR(st.st_mode)) continue;
        if (depth <= 0) {
            rc = -1;
            break;
        }
        int flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
        int sub = openat(dirfd(d), e->d_name, flags);
        if (sub < 0 && errno == EACCES && fchmodat(dirfd(d), e->d_name, 0700, 0) == 0)
            sub = openat(dirfd(d), e->d_name, flags);
        if (sub >= 0) rc = usage_at(sub, bytes, inodes, depth - 1);
    }
    closedir(d);
    return rc;
}

int dir_over(const char *dir, long long max_bytes, long max_inodes) {
    long long bytes = 0;
    long inodes = 0;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return 0;
    if (usage_at(fd, &bytes, &inodes, 32) != 0) return 1;
    return bytes > max_bytes || inodes > max_inodes;
}
