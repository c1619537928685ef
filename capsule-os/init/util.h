/* Small helpers shared by every capsule-init module. */
#ifndef CAPSULE_INIT_UTIL_H
#define CAPSULE_INIT_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Content hash of the sources, set by the Makefile; Hello.build_id. */
#ifndef CAPSULE_INIT_BUILD_ID
#define CAPSULE_INIT_BUILD_ID "capsule-init-dev"
#endif

/* Where logmsg writes; the app's child process points it at the console
 * before its own stderr becomes a pipe. */
extern int log_fd;

/* One "capsule-init: ..." line on the console. */
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

int64_t now_ms(void);
void sleep_ms(int ms);

/* Replaces `path` with `data` atomically (temp file + rename), so a reader
 * never sees a half-written file. */
int write_file_atomic(const char *path, const char *data);

/* Reads up to cap-1 bytes of a small file and NUL-terminates; -1 on error. */
ssize_t read_small_file(const char *path, char *buf, size_t cap);

/* Is there a virtio device with this id? Lets boot wait for a device the
 * driver sets up asynchronously only when it can appear at all. */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
bool virtio_device_present(int id);

#endif
