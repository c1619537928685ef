#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

int log_fd = STDERR_FILENO;

void logmsg(const char *fmt, ...)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "capsule-init: ");
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
    va_end(ap);
    n += (m < 0) ? 0 : (m >= (int)(sizeof buf - n - 1) ? (int)(sizeof buf - n - 2) : m);
    buf[n++] = '\n';
    (void)!write(log_fd, buf, n);
}

int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

int write_file_atomic(const char *path, const char *data)
{
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    size_t len = strlen(data);
    ssize_t n = write(fd, data, len);
    bool ok = n == (ssize_t)len;
    int err = ok ? 0 : (n < 0 ? errno : EIO);
    if (close(fd) < 0 && ok) { ok = false; err = errno; }
    if (ok && rename(tmp, path) < 0) { ok = false; err = errno; }
    if (!ok) {
        unlink(tmp);
        errno = err;
        return -1;
    }
    return 0;
}

ssize_t read_small_file(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t len = 0;
    while (len + 1 < cap) {
        ssize_t n = read(fd, buf + len, cap - 1 - len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { close(fd); return -1; }
        if (n == 0) break;
        len += n;
    }
    close(fd);
    buf[len] = 0;
    return (ssize_t)len;
}

bool virtio_device_present(int id)
{
    bool found = false;
    DIR *d = opendir("/sys/bus/virtio/devices");
    if (!d) return false;
    struct dirent *e;
    while (!found && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[PATH_MAX], buf[32];
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", e->d_name);
        if (read_small_file(path, buf, sizeof buf) > 0 && strtol(buf, NULL, 0) == id) found = true;
    }
    closedir(d);
    return found;
}
