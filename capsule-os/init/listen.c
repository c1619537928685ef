#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#include "flexcap/guest/v1/guest.pb.h"
#include "listen.h"

#define TCP_LISTEN 0x0A
#define UDP_UNCONNECTED 0x07 /* TCP_CLOSE, what /proc/net/udp shows for a bound socket */

/* Inserts keeping the set sorted and unique; when full, only entries that
 * sort before the current last one get in (the last one drops out). */
static void set_add(struct listen_set *s, uint8_t proto, uint16_t port)
{
    uint32_t key = (uint32_t)proto << 16 | port;
    unsigned i = s->n;
    while (i > 0 && ((uint32_t)s->e[i - 1].proto << 16 | s->e[i - 1].port) > key) i--;
    if (i > 0 && s->e[i - 1].proto == proto && s->e[i - 1].port == port) return;
    if (i == FLEXCAP_MAX_LISTEN_PORTS) return;
    unsigned last = s->n < FLEXCAP_MAX_LISTEN_PORTS ? s->n : FLEXCAP_MAX_LISTEN_PORTS - 1;
    memmove(&s->e[i + 1], &s->e[i], (last - i) * sizeof s->e[0]);
    s->e[i].proto = proto;
    s->e[i].port = port;
    if (s->n < FLEXCAP_MAX_LISTEN_PORTS) s->n++;
}

/* Exactly `len` hex digits; false on anything else. */
static bool hex(const char *p, size_t len, uint32_t *out)
{
    uint32_t v = 0;
    for (size_t i = 0; i < len; i++) {
        char ch = p[i];
        int d = (ch >= '0' && ch <= '9') ? ch - '0' : (ch >= 'A' && ch <= 'F') ? ch - 'A' + 10
              : (ch >= 'a' && ch <= 'f') ? ch - 'a' + 10 : -1;
        if (d < 0) return false;
        v = v << 4 | (uint32_t)d;
    }
    *out = v;
    return true;
}

/* "HEX:PORT" where HEX is the address as the kernel prints it: 32-bit words
 * of the in-memory address, each with %08X. Rebuilding the words in host
 * order gives back the address bytes. */
static bool parse_endpoint(const char *tok, size_t len, uint8_t addr[16], size_t *alen, uint16_t *port)
{
    size_t words = (len == 8 + 1 + 4) ? 1 : (len == 32 + 1 + 4) ? 4 : 0;
    if (!words || tok[words * 8] != ':') return false;
    for (size_t w = 0; w < words; w++) {
        uint32_t v;
        if (!hex(tok + w * 8, 8, &v)) return false;
        memcpy(addr + w * 4, &v, 4);
    }
    uint32_t p;
    if (!hex(tok + words * 8 + 1, 4, &p)) return false;
    *alen = words * 4;
    *port = (uint16_t)p;
    return true;
}

static bool is_loopback(const uint8_t *a, size_t len)
{
    static const uint8_t v6_loop[16] = { [15] = 1 };
    static const uint8_t v4_mapped[12] = { [10] = 0xff, [11] = 0xff };
    if (len == 4) return a[0] == 127;
    return memcmp(a, v6_loop, 16) == 0 || (memcmp(a, v4_mapped, 12) == 0 && a[12] == 127);
}

static bool all_zero(const uint8_t *a, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (a[i]) return false;
    return true;
}

/* One table row: "sl: local remote st ..."; malformed rows are skipped. */
static void parse_line(const char *line, size_t len, bool udp, struct listen_set *s)
{
    const char *tok[4];
    size_t tlen[4];
    size_t i = 0, k = 0;
    while (k < 4) {
        while (i < len && line[i] == ' ') i++;
        if (i == len) return;
        tok[k] = line + i;
        while (i < len && line[i] != ' ') i++;
        tlen[k] = (size_t)(line + i - tok[k]);
        k++;
    }
    if (tlen[0] < 2 || tok[0][tlen[0] - 1] != ':') return; /* also skips the header */
    uint8_t laddr[16], raddr[16];
    size_t llen, rlen;
    uint16_t lport, rport;
    uint32_t st;
    if (!parse_endpoint(tok[1], tlen[1], laddr, &llen, &lport) ||
        !parse_endpoint(tok[2], tlen[2], raddr, &rlen, &rport) ||
        tlen[3] != 2 || !hex(tok[3], 2, &st) || lport == 0 || is_loopback(laddr, llen))
        return;
    if (!udp && st == TCP_LISTEN)
        set_add(s, flexcap_guest_v1_Protocol_PROTOCOL_TCP, lport);
    else if (udp && st == UDP_UNCONNECTED && rport == 0 && all_zero(raddr, rlen))
        set_add(s, flexcap_guest_v1_Protocol_PROTOCOL_UDP, lport);
}

static void scan_file(const char *path, bool udp, struct listen_set *s)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return; /* no IPv6, or no /proc: nothing listens there */
    char buf[4096];
    size_t have = 0;
    bool skipping = false; /* inside an over-long line */
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof buf - have);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        have += n;
        size_t start = 0;
        for (char *nl; (nl = memchr(buf + start, '\n', have - start));) {
            size_t end = (size_t)(nl - buf);
            if (!skipping) parse_line(buf + start, end - start, udp, s);
            skipping = false;
            start = end + 1;
        }
        memmove(buf, buf + start, have - start);
        have -= start;
        if (have == sizeof buf) { /* rows are ~150 bytes; this is not one */
            skipping = true;
            have = 0;
        }
    }
    close(fd);
}

void listen_scan(struct listen_set *out)
{
    out->n = 0;
    scan_file("/proc/net/tcp", false, out);
    scan_file("/proc/net/tcp6", false, out);
    scan_file("/proc/net/udp", true, out);
    scan_file("/proc/net/udp6", true, out);
}

bool listen_equal(const struct listen_set *a, const struct listen_set *b)
{
    if (a->n != b->n) return false;
    for (unsigned i = 0; i < a->n; i++) /* field by field: the entries have padding */
        if (a->e[i].proto != b->e[i].proto || a->e[i].port != b->e[i].port) return false;
    return true;
}
