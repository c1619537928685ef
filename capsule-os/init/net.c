#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net.h"
#include "util.h"

#define NET_IFNAME "eth0"
#define MAX_DEFAULT_ROUTES 16 /* bound on the delete loop */

static const char *resolv_file = "/etc/resolv.conf";

static bool fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static bool fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    /* The message echoes host input: keep it one printable ASCII line (also
     * valid UTF-8 after truncation). */
    for (char *p = err; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f) *p = '?';
    return false;
}

static int if_up(int sock, const char *ifname)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0) return -1;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    return ioctl(sock, SIOCSIFFLAGS, &ifr);
}

static int if_set(int sock, unsigned long req, struct in_addr a)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, NET_IFNAME, IFNAMSIZ - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    sin->sin_addr = a;
    return ioctl(sock, req, &ifr);
}

/* Default route ioctl; gw NULL matches any default route (for delete). */
static int default_route(int sock, unsigned long req, const struct in_addr *gw)
{
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    struct sockaddr_in *dst = (struct sockaddr_in *)&rt.rt_dst;
    struct sockaddr_in *msk = (struct sockaddr_in *)&rt.rt_genmask;
    struct sockaddr_in *gwa = (struct sockaddr_in *)&rt.rt_gateway;
    dst->sin_family = msk->sin_family = AF_INET;
    rt.rt_flags = RTF_UP;
    if (gw) {
        gwa->sin_family = AF_INET;
        gwa->sin_addr = *gw;
        rt.rt_flags |= RTF_GATEWAY;
    }
    return ioctl(sock, req, &rt);
}

void net_init(const char *resolv_path)
{
    resolv_file = resolv_path;
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || if_up(sock, "lo") < 0) logmsg("lo up: %s", strerror(errno));
    if (sock >= 0) close(sock);
}

/* Strict "a.b.c.d/len" (len 1-32) -> address and netmask. */
static bool parse_cidr(const char *s, struct in_addr *addr, struct in_addr *mask)
{
    char ip[INET_ADDRSTRLEN];
    const char *slash = strchr(s, '/');
    if (!slash || (size_t)(slash - s) >= sizeof ip) return false;
    memcpy(ip, s, slash - s);
    ip[slash - s] = 0;
    if (inet_pton(AF_INET, ip, addr) != 1) return false;
    const char *p = slash + 1;
    size_t digits = strspn(p, "0123456789");
    if (digits < 1 || digits > 2 || p[digits]) return false;
    int plen = atoi(p);
    if (plen < 1 || plen > 32) return false;
    mask->s_addr = htonl(0xffffffffu << (32 - plen));
    return true;
}

/* Addresses a host interface must not take: 0/8, loopback, multicast, class E. */
static bool usable_host(struct in_addr a)
{
    uint32_t h = ntohl(a.s_addr);
    return (h >> 24) != 0 && (h >> 24) != 127 && (h >> 29) != 7;
}

bool net_apply(const char *cidr, const char *gw, const char *dns, int wait_ms,
               char *err, size_t errlen)
{
    struct in_addr addr, mask, gwa;
    unsigned char dnsbuf[sizeof(struct in6_addr)];
    if (!parse_cidr(cidr, &addr, &mask))
        return fail(err, errlen, "address '%.64s' is not IPv4 a.b.c.d/len (len 1-32)", cidr);
    if (!usable_host(addr))
        return fail(err, errlen, "address %.64s is not a usable host address", cidr);
    if (gw[0]) {
        if (inet_pton(AF_INET, gw, &gwa) != 1 || !usable_host(gwa))
            return fail(err, errlen, "gateway '%.64s' is not a usable IPv4 address", gw);
        if (gwa.s_addr == addr.s_addr || (gwa.s_addr & mask.s_addr) != (addr.s_addr & mask.s_addr))
            return fail(err, errlen, "gateway %.64s is not another host in %.64s", gw, cidr);
    }
    if (dns[0] && inet_pton(AF_INET, dns, dnsbuf) != 1 && inet_pton(AF_INET6, dns, dnsbuf) != 1)
        return fail(err, errlen, "dns '%.64s' is not an IP address", dns);

    /* eth0 appears asynchronously after virtio_net probes; wait only at boot. */
    int64_t deadline = now_ms() + wait_ms;
    while (if_nametoindex(NET_IFNAME) == 0) {
        if (now_ms() >= deadline) return fail(err, errlen, "%s is not present", NET_IFNAME);
        sleep_ms(10);
    }
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return fail(err, errlen, "socket: %s", strerror(errno));
    bool ok = false;
    /* Old default routes go first: one via a gateway outside the new subnet
     * would otherwise linger. Re-addressing drops the routes through eth0's
     * old address anyway. */
    for (int i = 0; i < MAX_DEFAULT_ROUTES && default_route(sock, SIOCDELRT, NULL) == 0; i++) {}
    if (if_set(sock, SIOCSIFADDR, addr) < 0) {
        fail(err, errlen, "set %s address %s: %s", NET_IFNAME, cidr, strerror(errno));
    } else if (if_set(sock, SIOCSIFNETMASK, mask) < 0) {
        fail(err, errlen, "set %s netmask of %s: %s", NET_IFNAME, cidr, strerror(errno));
    } else if (if_up(sock, NET_IFNAME) < 0) {
        fail(err, errlen, "bring %s up: %s", NET_IFNAME, strerror(errno));
    } else if (gw[0] && default_route(sock, SIOCADDRT, &gwa) < 0 && errno != EEXIST) {
        fail(err, errlen, "default route via %s: %s", gw, strerror(errno));
    } else {
        char conf[96] = "";
        if (dns[0]) snprintf(conf, sizeof conf, "nameserver %s\n", dns);
        if (write_file_atomic(resolv_file, conf) < 0)
            fail(err, errlen, "write %s: %s", resolv_file, strerror(errno));
        else
            ok = true;
    }
    close(sock);
    if (ok) logmsg("%s %s gw %s dns %s", NET_IFNAME, cidr, gw[0] ? gw : "-", dns[0] ? dns : "-");
    return ok;
}
