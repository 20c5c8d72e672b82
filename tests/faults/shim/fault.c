/* Fault injection for the fault tests: LD_PRELOAD'ed into a real `caducee serve`.
 *
 * Only files under FAULT_PREFIX (an absolute path: the node's state folder) are touched; the fault in
 * force is read from the file FAULT_CONTROL on every intercepted call, so a test switches it on and off
 * while the server runs. An absent or empty control file means no fault. One directive per line:
 *
 *   fsync=EIO[:KIND:SUBSTR]   fsync()/fdatasync() fail with EIO and sync nothing
 *   close=EIO[:KIND:SUBSTR]   close() of a file open for writing closes it, then reports EIO (a write
 *                             error deferred to close, as NFS or a failing disk does)
 *   write=ENOSPC              write()/pwrite() fail with ENOSPC (only when FAULT_WRITE=1 at start:
 *                             intercepting every write costs a control-file read per call)
 *   kill=N:KIND:SUBSTR        SIGKILL the process inside its Nth fsync()/fdatasync() (counted from when
 *                             the directive appears) of a matching path. The data of that call is not
 *                             synced: the crash happens first.
 *
 * KIND:SUBSTR narrows a directive to paths containing SUBSTR that are of KIND: file, dir or any.
 *
 * Built by the tests:  gcc -shared -fPIC -O2 -o fault.so fault.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_close)(int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);

static const char *prefix;
static size_t prefix_len;
static const char *control;
static int intercept_write;
static int kill_count; /* matching fsyncs seen while a kill directive is in force */

__attribute__((constructor)) static void fault_init(void) {
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_close = dlsym(RTLD_NEXT, "close");
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    prefix = getenv("FAULT_PREFIX");
    prefix_len = prefix ? strlen(prefix) : 0;
    control = getenv("FAULT_CONTROL");
    const char *w = getenv("FAULT_WRITE");
    intercept_write = w && strcmp(w, "1") == 0;
}

/* The control file's text, or "" (no fault). Never calls an intercepted function but close. */
static void read_control(char *buf, size_t size) {
    buf[0] = '\0';
    if (!control || !prefix_len)
        return;
    int saved = errno;
    int fd = open(control, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, buf, size - 1);
        buf[n > 0 ? n : 0] = '\0';
        real_close(fd);
    }
    errno = saved;
}

/* Whether fd names something under the prefix; its path goes to `path`. */
static int under_prefix(int fd, char *path, size_t size) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    int saved = errno;
    ssize_t n = readlink(link, path, size - 1);
    errno = saved;
    if (n <= 0)
        return 0;
    path[n] = '\0';
    return strncmp(path, prefix, prefix_len) == 0;
}

/* The start of the line beginning with `name`, or NULL. */
static const char *find_line(const char *text, const char *name) {
    size_t len = strlen(name);
    for (const char *p = text; (p = strstr(p, name)) != NULL; p += len) {
        if (p == text || p[-1] == '\n')
            return p;
    }
    return NULL;
}

/* Whether the fd (named `path`) is of `kind` (file, dir, any) and its path contains `substr`. */
static int matches(int fd, const char *path, const char *kind, const char *substr) {
    if (!strstr(path, substr))
        return 0;
    if (strcmp(kind, "any") == 0)
        return 1;
    struct stat st;
    if (fstat(fd, &st) != 0)
        return 0;
    return strcmp(kind, "dir") == 0 ? S_ISDIR(st.st_mode) : !S_ISDIR(st.st_mode);
}

/* Whether the directive `name` (e.g. "fsync=EIO") is in force for this fd. */
static int directive(const char *ctl, const char *name, int fd, const char *path) {
    const char *line = find_line(ctl, name);
    if (!line)
        return 0;
    line += strlen(name);
    if (*line == '\0' || *line == '\n' || *line == '\r')
        return 1;
    char kind[8] = "", substr[256] = "";
    if (sscanf(line, ":%7[a-z]:%255[^\n\r]", kind, substr) != 2)
        return 0;
    return matches(fd, path, kind, substr);
}

static void maybe_kill(const char *ctl, int fd, const char *path) {
    const char *k = find_line(ctl, "kill=");
    if (!k)
        return;
    int n = 0;
    char kind[8] = "", substr[256] = "";
    if (sscanf(k, "kill=%d:%7[a-z]:%255[^\n\r]", &n, kind, substr) != 3 || !matches(fd, path, kind, substr))
        return;
    if (__atomic_add_fetch(&kill_count, 1, __ATOMIC_SEQ_CST) >= n)
        raise(SIGKILL);
}

static int sync_fault(int fd) {
    char ctl[512], path[4096];
    read_control(ctl, sizeof ctl);
    if (!ctl[0] || !under_prefix(fd, path, sizeof path))
        return 0;
    maybe_kill(ctl, fd, path);
    if (directive(ctl, "fsync=EIO", fd, path)) {
        errno = EIO;
        return -1;
    }
    return 0;
}

int fsync(int fd) {
    if (sync_fault(fd))
        return -1;
    return real_fsync(fd);
}

int fdatasync(int fd) {
    if (sync_fault(fd))
        return -1;
    return real_fdatasync(fd);
}

int close(int fd) {
    char ctl[512], path[4096];
    read_control(ctl, sizeof ctl);
    if (!ctl[0] || !find_line(ctl, "close=EIO"))
        return real_close(fd);
    int flags = fcntl(fd, F_GETFL);
    int writing = flags >= 0 && (flags & O_ACCMODE) != O_RDONLY;
    int target = writing && under_prefix(fd, path, sizeof path) && directive(ctl, "close=EIO", fd, path);
    int rc = real_close(fd);
    if (rc == 0 && target) {
        errno = EIO;
        return -1;
    }
    return rc;
}

static int write_fault(int fd) {
    if (!intercept_write)
        return 0;
    char ctl[512], path[4096];
    read_control(ctl, sizeof ctl);
    if (!ctl[0] || !find_line(ctl, "write=ENOSPC") || !under_prefix(fd, path, sizeof path))
        return 0;
    errno = ENOSPC;
    return 1;
}

ssize_t write(int fd, const void *buf, size_t count) {
    if (write_fault(fd))
        return -1;
    return real_write(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    if (write_fault(fd))
        return -1;
    return real_pwrite(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    if (write_fault(fd))
        return -1;
    return real_pwrite64(fd, buf, count, offset);
}
