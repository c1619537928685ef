#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "boot.h"
#include "flexcap_wire.h"
#include "util.h"

#define ROOT_WAIT_MS 3000 /* the block device node shows up asynchronously */

static bool mount_one(const char *src, const char *dst, const char *type,
                      unsigned long flags, const char *data, bool optional)
{
    mkdir(dst, 0755); /* usually exists; if it cannot, mount says so */
    if (mount(src, dst, type, flags, data) == 0 || errno == EBUSY) return true;
    /* Optional: a tiny kernel may lack the filesystem (ENODEV); say nothing then. */
    if (!optional || errno != ENODEV) logmsg("mount %s on %s: %s", type, dst, strerror(errno));
    return optional;
}

static void setup_console(void)
{
    int in = open("/dev/null", O_RDWR);
    int out = open("/dev/console", O_RDWR | O_NOCTTY);
    if (in >= 0 && in != 0) { dup2(in, 0); close(in); }
    if (out >= 0) {
        dup2(out, 1);
        dup2(out, 2);
        if (out > 2) close(out);
    }
}

#define NOSUID_NODEV (MS_NOSUID | MS_NODEV)

/* The mounts an app expects below a root directory, /dev first. Optional
 * ones are conveniences an app can live without. */
static const struct {
    const char *dir, *type;
    unsigned long flags;
    const char *data;
    bool optional;
} std_mounts[] = {
    { "/dev", "devtmpfs", MS_NOSUID, "mode=0755", false },
    { "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666", true },
    { "/dev/shm", "tmpfs", NOSUID_NODEV, "mode=1777", true },
    { "/proc", "proc", NOSUID_NODEV | MS_NOEXEC, NULL, false },
    { "/sys", "sysfs", NOSUID_NODEV | MS_NOEXEC, NULL, false },
    { "/tmp", "tmpfs", NOSUID_NODEV, "mode=1777", false },
    { "/run", "tmpfs", NOSUID_NODEV, "mode=0755", false },
};

/* Mounts std_mounts[from..] below root; false if a required one failed. */
static bool mount_std(const char *root, size_t from)
{
    bool ok = true;
    for (size_t i = from; i < sizeof std_mounts / sizeof std_mounts[0]; i++) {
        char dst[PATH_MAX];
        snprintf(dst, sizeof dst, "%s%s", root, std_mounts[i].dir);
        ok &= mount_one(std_mounts[i].type, dst, std_mounts[i].type,
                        std_mounts[i].flags, std_mounts[i].data, std_mounts[i].optional);
    }
    return ok;
}

void boot_mount_basics(void)
{
    /* /dev first, so /dev/console surely exists before anything is logged. */
    mount_one("devtmpfs", "/dev", "devtmpfs", std_mounts[0].flags, std_mounts[0].data, false);
    setup_console();
    mount_std("", 1);
}

static int ko_filter(const struct dirent *d)
{
    size_t n = strlen(d->d_name);
    return n > 3 && strcmp(d->d_name + n - 3, ".ko") == 0;
}

void boot_load_modules(void)
{
    struct dirent **list;
    int n = scandir(FLEXCAP_MODULE_DIR, &list, ko_filter, alphasort);
    if (n < 0) { /* kernels with everything built in ship no modules */
        if (errno != ENOENT) logmsg("module dir %s: %s", FLEXCAP_MODULE_DIR, strerror(errno));
        return;
    }
    for (int i = 0; i < n; i++) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", FLEXCAP_MODULE_DIR, list[i]->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            logmsg("module %s: %s", path, strerror(errno));
        } else {
            if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
                logmsg("module %s: %s", list[i]->d_name, strerror(errno));
            close(fd);
        }
        free(list[i]);
    }
    free(list);
}

/* Copies the value of "key=value" into dst when `tok` has that key. */
static void take_arg(const char *tok, size_t toklen, const char *key, char *dst, size_t cap)
{
    size_t klen = strlen(key);
    if (toklen <= klen || strncmp(tok, key, klen) != 0 || tok[klen] != '=') return;
    size_t vlen = toklen - klen - 1;
    if (vlen >= cap) {
        logmsg("%s= is too long; ignored", key);
        return;
    }
    memcpy(dst, tok + klen + 1, vlen); /* a later occurrence wins, as in the kernel */
    dst[vlen] = 0;
}

void boot_read_cmdline(struct boot_args *a)
{
    memset(a, 0, sizeof *a);
    char buf[4096]; /* COMMAND_LINE_SIZE is 2048 on x86 */
    if (read_small_file("/proc/cmdline", buf, sizeof buf) < 0) {
        logmsg("/proc/cmdline: %s", strerror(errno));
        return;
    }
    for (char *p = buf; *p;) {
        p += strspn(p, " \t\n");
        size_t len = strcspn(p, " \t\n");
        if (len == 0) break;
        take_arg(p, len, FLEXCAP_CMDLINE_IP, a->ip, sizeof a->ip);
        take_arg(p, len, FLEXCAP_CMDLINE_GW, a->gw, sizeof a->gw);
        take_arg(p, len, FLEXCAP_CMDLINE_DNS, a->dns, sizeof a->dns);
        take_arg(p, len, FLEXCAP_CMDLINE_ROOT, a->root, sizeof a->root);
        p += len;
    }
}

/* A bare device name ("vda"): it is appended to /dev/, so no '/' or "..". */
static bool valid_dev_name(const char *s)
{
    if (!*s) return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
              (*s >= '0' && *s <= '9') || *s == '_' || *s == '-'))
            return false;
    return true;
}

bool boot_mount_app_root(const char *dev)
{
    if (!valid_dev_name(dev)) {
        logmsg("%s=%s is not a device name", FLEXCAP_CMDLINE_ROOT, dev);
        return false;
    }
    char path[64];
    snprintf(path, sizeof path, "/dev/%s", dev);
    /* devtmpfs creates the node shortly after the driver probes the disk;
     * a bounded wait, only at boot, and only if there is a disk at all. */
    int wait_ms = virtio_device_present(VIRTIO_ID_BLOCK) ? ROOT_WAIT_MS : 0;
    int64_t deadline = now_ms() + wait_ms;
    struct stat st;
    while (stat(path, &st) < 0 || !S_ISBLK(st.st_mode)) {
        if (now_ms() >= deadline) {
            if (wait_ms) logmsg("root device %s did not appear within %d ms", path, wait_ms);
            else logmsg("root device %s does not exist (no virtio disk attached)", path);
            return false;
        }
        sleep_ms(10);
    }
    mkdir(APP_ROOT_DIR, 0755);
    /* nodev: device nodes come from our devtmpfs, never from the image. */
    if (mount(path, APP_ROOT_DIR, "erofs", MS_RDONLY | MS_NODEV, NULL) < 0) {
        logmsg("mount %s (erofs, read-only) on %s: %s", path, APP_ROOT_DIR, strerror(errno));
        return false;
    }
    if (!mount_std(APP_ROOT_DIR, 0)) {
        logmsg("app root on %s: a required mount failed", path);
        return false;
    }
    logmsg("app root %s mounted read-only on %s", path, APP_ROOT_DIR);
    return true;
}
