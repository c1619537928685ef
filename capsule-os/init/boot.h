/* Bringing the guest system up: pseudo filesystems, kernel modules, the
 * kernel command line and the app's optional read-only root disk. */
#ifndef CAPSULE_INIT_BOOT_H
#define CAPSULE_INIT_BOOT_H

#include <stdbool.h>

/* Where the app's erofs root is mounted when the command line names one. */
#define APP_ROOT_DIR "/newroot"

/* The flexcap.* keys of /proc/cmdline; "" when absent. */
struct boot_args {
    char ip[64];
    char gw[64];
    char dns[64];
    char root[32];
};

/* /dev, the console as fds 0-2, /proc, /sys, /tmp, /run, /dev/pts, /dev/shm. */
void boot_mount_basics(void);

/* FLEXCAP_MODULE_DIR/\*.ko in lexical order; quiet when there are none. */
void boot_load_modules(void);

void boot_read_cmdline(struct boot_args *a);

/* Waits for /dev/DEV, mounts it read-only (erofs) on APP_ROOT_DIR and gives
 * it /proc, /sys, /dev, /tmp and /run. False (logged) when that failed. */
bool boot_mount_app_root(const char *dev);

#endif
