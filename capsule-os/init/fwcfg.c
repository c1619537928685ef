#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <unistd.h>

#include <pb_decode.h>

#include "flexcap_wire.h"
#include "fwcfg.h"
#include "util.h"

/* QEMU fw_cfg, x86 I/O port interface: write a 16-bit selector to 0x510, then
 * read the item byte by byte from 0x511. Item 0x19 is the file directory:
 * be32 count, then count * { be32 size, be16 select, be16 reserved,
 * char name[56] }. Present on pc, q35 and microvm; needs only ioperm. */
#define FW_CFG_PORT_SEL 0x510
#define FW_CFG_PORT_DATA 0x511
#define FW_CFG_SIGNATURE 0x0000
#define FW_CFG_FILE_DIR 0x0019
#define FW_CFG_MAX_FILE (16u << 20)

static void fwcfg_read(void *buf, size_t len)
{
    uint8_t *p = buf;
    for (size_t i = 0; i < len; i++) p[i] = inb(FW_CFG_PORT_DATA);
}

static uint32_t be32(const uint8_t *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

/* Returns a malloc'd copy of fw_cfg file `name`, or NULL (errno set). */
static uint8_t *fwcfg_read_file(const char *name, size_t *len_out)
{
    uint8_t *data = NULL;
    if (ioperm(FW_CFG_PORT_SEL, 2, 1) < 0) return NULL;

    uint8_t b[4];
    outw(FW_CFG_SIGNATURE, FW_CFG_PORT_SEL);
    fwcfg_read(b, 4);
    if (memcmp(b, "QEMU", 4) != 0) { errno = ENODEV; goto out; }

    outw(FW_CFG_FILE_DIR, FW_CFG_PORT_SEL);
    fwcfg_read(b, 4);
    uint32_t count = be32(b);
    errno = ENOENT;
    for (uint32_t i = 0; i < count && i < 4096; i++) {
        uint8_t ent[64];
        fwcfg_read(ent, sizeof ent);
        uint32_t size = be32(ent);
        uint16_t select = (uint16_t)(ent[4] << 8 | ent[5]);
        ent[63] = 0;
        if (strcmp((char *)ent + 8, name) != 0) continue;
        if (size > FW_CFG_MAX_FILE || !(data = malloc(size ? size : 1))) { errno = EFBIG; break; }
        outw(select, FW_CFG_PORT_SEL);
        fwcfg_read(data, size);
        *len_out = size;
        break;
    }
out:
    ioperm(FW_CFG_PORT_SEL, 2, 0);
    return data;
}

/* Fallback when port I/O is not allowed (e.g. kernel lockdown): the
 * qemu_fw_cfg driver's sysfs view, if that module was loaded. */
static uint8_t *fwcfg_read_sysfs(const char *name, size_t *len_out)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "/sys/firmware/qemu_fw_cfg/by_name/%s/raw", name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    uint8_t *data = NULL;
    size_t cap = 0, len = 0;
    for (;;) {
        if (len == cap) {
            uint8_t *p = (cap < FW_CFG_MAX_FILE) ? realloc(data, cap = cap ? cap * 2 : 4096) : NULL;
            if (!p) { free(data); data = NULL; break; }
            data = p;
        }
        ssize_t n = read(fd, data + len, cap - len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { free(data); data = NULL; }
        if (n <= 0) break;
        len += n;
    }
    close(fd);
    *len_out = len;
    return data;
}

bool launch_config_read(flexcap_guest_v1_LaunchConfig *cfg)
{
    size_t len = 0;
    uint8_t *buf = fwcfg_read_file(FLEXCAP_FWCFG_LAUNCH_NAME, &len);
    if (!buf) {
        int err = errno;
        buf = fwcfg_read_sysfs(FLEXCAP_FWCFG_LAUNCH_NAME, &len);
        if (!buf) {
            logmsg("fw_cfg %s: %s", FLEXCAP_FWCFG_LAUNCH_NAME, strerror(err));
            return false;
        }
    }
    pb_istream_t is = pb_istream_from_buffer(buf, len);
    bool ok = pb_decode(&is, flexcap_guest_v1_LaunchConfig_fields, cfg);
    if (!ok) logmsg("bad LaunchConfig (%zu bytes): %s", len, PB_GET_ERROR(&is));
    free(buf);
    return ok;
}
