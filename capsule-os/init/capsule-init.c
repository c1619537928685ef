/*
 * capsule-init: PID 1 of a FlexCapsule guest (QEMU microvm).
 *
 * Boot sequence:
 *   1. mount /dev (devtmpfs), /proc, /sys, /tmp, /run (+ /dev/pts, /dev/shm)
 *   2. load FLEXCAP_MODULE_DIR/\*.ko in lexical order (finit_module)
 *   3. read the LaunchConfig from the fw_cfg file FLEXCAP_FWCFG_LAUNCH_NAME
 *      through the x86 fw_cfg I/O ports (no kernel driver needed)
 *   4. hostname, lo + eth0 static IPv4, default route, /etc/resolv.conf
 *   5. open the virtio-serial port FLEXCAP_OS_PORT_NAME (optional)
 *   6. fork+exec the app, then serve the host protocol and reap zombies
 *   7. when the app exits: send Exited, sync, power off.
 *
 * Protocol: frames are a 4-byte big-endian length + protobuf (HostMessage in,
 * GuestMessage out), see proto/flexcap/guest/v1/guest.proto. All channel I/O
 * is non-blocking; the only blocking call in the main loop is poll().
 *
 * Session (re)establishment, i.e. when Hello is sent:
 *   a) every time the guest observes the host end becoming connected (the
 *      port stops reporting POLLHUP; checked on every wakeup, on SIGIO that
 *      virtio_console raises on host open/close, and once per second);
 *   b) before handling any host frame that arrives while the current
 *      connection has no accepted HelloReply (at most once per second), so
 *      a host that sees no Hello can provoke one by sending Ping;
 *   c) when a HelloReply arrives although no Hello is outstanding: the host
 *      uses this to ask for a fresh Hello (covers a close+reopen of the host
 *      end so fast that the guest never saw it disconnected);
 *   d) right after an oversized host frame (> FLEXCAP_MAX_FRAME_BYTES): its
 *      body is read and discarded (the length prefix keeps the stream in
 *      sync) and the session starts over.
 * Frames queued for a connection that goes away are dropped.
 * Hello is sent only while the host end is connected: writes to a port whose
 * host end is closed would fail (EAGAIN), and nothing is buffered for it.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <pb_decode.h>
#include <pb_encode.h>

#include "flexcap/guest/v1/guest.pb.h"
#include "flexcap_wire.h"

#ifndef CAPSULE_INIT_BUILD_ID
#define CAPSULE_INIT_BUILD_ID "capsule-init-dev"
#endif

#define NET_IFNAME "eth0"
#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define PORT_WAIT_MS 2000       /* at boot, wait this long for the port to appear */
#define NET_WAIT_MS 3000        /* ... and for eth0 */
#define RECHECK_MS 1000         /* rescan for the port / host end this often */
#define HELLO_RESEND_MS 1000    /* rule b) rate limit */
#define EXIT_FLUSH_MS 2000      /* how long Exited may take to drain */
#define SIGNAL_GRACE_MS 10000   /* grace when PID 1 itself gets SIGTERM/SIGPWR */

typedef flexcap_guest_v1_LaunchConfig LaunchConfig;
typedef flexcap_guest_v1_GuestMessage GuestMessage;
typedef flexcap_guest_v1_HostMessage HostMessage;

/* ------------------------------------------------------------------ utils */

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "capsule-init: ");
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
    va_end(ap);
    n += (m < 0) ? 0 : (m >= (int)(sizeof buf - n - 1) ? (int)(sizeof buf - n - 2) : m);
    buf[n++] = '\n';
    (void)!write(STDERR_FILENO, buf, n);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

static int write_file(const char *path, const char *data)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    size_t len = strlen(data);
    ssize_t n = write(fd, data, len);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

/* ----------------------------------------------------------- filesystems */

static void mount_one(const char *src, const char *dst, const char *type,
                      unsigned long flags, const char *data)
{
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) < 0 && errno != EBUSY)
        logmsg("mount %s on %s: %s", type, dst, strerror(errno));
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

static void mount_filesystems(void)
{
    const unsigned long nosuid_nodev = MS_NOSUID | MS_NODEV;
    mount_one("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    setup_console(); /* now that /dev/console surely exists */
    mount_one("proc", "/proc", "proc", nosuid_nodev | MS_NOEXEC, NULL);
    mount_one("sysfs", "/sys", "sysfs", nosuid_nodev | MS_NOEXEC, NULL);
    mount_one("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777");
    mount_one("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755");
    mount_one("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666");
    mount_one("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777");
}

/* --------------------------------------------------------------- modules */

static int ko_filter(const struct dirent *d)
{
    size_t n = strlen(d->d_name);
    return n > 3 && strcmp(d->d_name + n - 3, ".ko") == 0;
}

static void load_modules(void)
{
    struct dirent **list;
    int n = scandir(FLEXCAP_MODULE_DIR, &list, ko_filter, alphasort);
    if (n < 0) {
        logmsg("no module dir %s: %s", FLEXCAP_MODULE_DIR, strerror(errno));
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

/* ---------------------------------------------------------------- fw_cfg */

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

static uint32_t fwcfg_be32(void)
{
    uint8_t b[4];
    fwcfg_read(b, 4);
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

/* Returns a malloc'd copy of fw_cfg file `name`, or NULL (errno set). */
static uint8_t *fwcfg_read_file(const char *name, size_t *len_out)
{
    uint8_t *data = NULL;
    if (ioperm(FW_CFG_PORT_SEL, 2, 1) < 0) return NULL;

    char sig[4];
    outw(FW_CFG_SIGNATURE, FW_CFG_PORT_SEL);
    fwcfg_read(sig, 4);
    if (memcmp(sig, "QEMU", 4) != 0) { errno = ENODEV; goto out; }

    outw(FW_CFG_FILE_DIR, FW_CFG_PORT_SEL);
    uint32_t count = fwcfg_be32();
    errno = ENOENT;
    for (uint32_t i = 0; i < count && i < 4096; i++) {
        uint8_t ent[64];
        fwcfg_read(ent, sizeof ent);
        uint32_t size = (uint32_t)ent[0] << 24 | (uint32_t)ent[1] << 16 | (uint32_t)ent[2] << 8 | ent[3];
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

static bool read_launch_config(LaunchConfig *cfg)
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

/* --------------------------------------------------------------- network */

/* Is there a virtio device with this virtio device id (1 = net, 3 = console)?
 * Used to wait for async driver setup only when it can succeed. */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_CONSOLE 3
static bool virtio_device_present(int id)
{
    bool found = false;
    DIR *d = opendir("/sys/bus/virtio/devices");
    if (!d) return false;
    struct dirent *e;
    while (!found && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[PATH_MAX], buf[32] = "";
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        if (read(fd, buf, sizeof buf - 1) > 0 && strtol(buf, NULL, 0) == id) found = true;
        close(fd);
    }
    closedir(d);
    return found;
}

static int wait_for_iface(const char *name, int timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;
    while (if_nametoindex(name) == 0) {
        if (now_ms() >= deadline) return -1;
        sleep_ms(10);
    }
    return 0;
}

static int if_set(int sock, const char *ifname, unsigned long req, struct in_addr a)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    sin->sin_addr = a;
    return ioctl(sock, req, &ifr);
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

/* "a.b.c.d/len" -> address and netmask. */
static bool parse_cidr(const char *s, struct in_addr *addr, struct in_addr *mask)
{
    char ip[64];
    const char *slash = strchr(s, '/');
    size_t iplen = slash ? (size_t)(slash - s) : strlen(s);
    if (iplen >= sizeof ip) return false;
    memcpy(ip, s, iplen);
    ip[iplen] = 0;
    if (inet_pton(AF_INET, ip, addr) != 1) return false;
    long plen = 32;
    if (slash) {
        char *end;
        plen = strtol(slash + 1, &end, 10);
        if (end == slash + 1 || *end || plen < 0 || plen > 32) return false;
    }
    mask->s_addr = htonl(plen == 0 ? 0 : 0xffffffffu << (32 - plen));
    return true;
}

static void setup_network(const LaunchConfig *cfg)
{
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) { logmsg("socket: %s", strerror(errno)); return; }
    if (if_up(sock, "lo") < 0) logmsg("lo up: %s", strerror(errno));

    const flexcap_guest_v1_NetConfig *net = &cfg->net;
    if (!cfg->has_net || !net->address_cidr[0]) {
        logmsg("no network configuration; only lo is up");
        goto out;
    }
    struct in_addr addr, mask, gw;
    if (!parse_cidr(net->address_cidr, &addr, &mask)) {
        logmsg("bad address_cidr '%s'", net->address_cidr);
        goto out;
    }
    if (wait_for_iface(NET_IFNAME, virtio_device_present(VIRTIO_ID_NET) ? NET_WAIT_MS : 0) < 0) {
        logmsg("%s did not appear; network not configured", NET_IFNAME);
        goto out;
    }
    if (if_set(sock, NET_IFNAME, SIOCSIFADDR, addr) < 0 ||
        if_set(sock, NET_IFNAME, SIOCSIFNETMASK, mask) < 0 ||
        if_up(sock, NET_IFNAME) < 0) {
        logmsg("configure %s: %s", NET_IFNAME, strerror(errno));
        goto out;
    }
    if (net->gateway[0]) {
        if (inet_pton(AF_INET, net->gateway, &gw) != 1) {
            logmsg("bad gateway '%s'", net->gateway);
        } else {
            struct rtentry rt;
            memset(&rt, 0, sizeof rt);
            struct sockaddr_in *dst = (struct sockaddr_in *)&rt.rt_dst;
            struct sockaddr_in *gwa = (struct sockaddr_in *)&rt.rt_gateway;
            struct sockaddr_in *msk = (struct sockaddr_in *)&rt.rt_genmask;
            dst->sin_family = gwa->sin_family = msk->sin_family = AF_INET;
            gwa->sin_addr = gw;
            rt.rt_flags = RTF_UP | RTF_GATEWAY;
            if (ioctl(sock, SIOCADDRT, &rt) < 0 && errno != EEXIST)
                logmsg("default route via %s: %s", net->gateway, strerror(errno));
        }
    }
    logmsg("%s %s gw %s", NET_IFNAME, net->address_cidr, net->gateway[0] ? net->gateway : "-");
    if (net->dns[0]) {
        char buf[96];
        snprintf(buf, sizeof buf, "nameserver %s\n", net->dns);
        mkdir("/etc", 0755);
        if (write_file("/etc/resolv.conf", buf) < 0)
            logmsg("write /etc/resolv.conf: %s", strerror(errno));
    }
out:
    close(sock);
}

/* --------------------------------------------------------------- channel */

struct chan {
    int fd;                 /* -1 while the port is not open */
    bool host_up;           /* host end connected, as last observed */
    unsigned hellos_pending; /* Hellos sent on this connection, not yet answered */
    bool accepted;          /* HelloReply{accepted} received on this connection */
    int64_t last_hello_ms;
    /* receive state: header, then payload (or discarding an oversized one) */
    uint8_t hdr[FLEXCAP_FRAME_HEADER_BYTES];
    size_t hdr_got;
    uint32_t need, got, discard;
    uint8_t rx[FLEXCAP_MAX_FRAME_BYTES];
    /* transmit queue of whole frames */
    uint8_t tx[8192];
    size_t tx_len;
    bool backlog_logged;
};

static struct chan ch = { .fd = -1 };

/* App state, shared with the frame handlers. */
static pid_t app_pid = -1;
static bool app_done;
static int app_status;
static bool term_sent;
static int64_t kill_deadline; /* 0 = none */

static void chan_reset_session(struct chan *c)
{
    c->hdr_got = 0;
    c->need = c->got = c->discard = 0;
    c->tx_len = 0;
    c->hellos_pending = 0;
    c->accepted = false;
}

static void chan_flush(struct chan *c)
{
    while (c->fd >= 0 && c->tx_len > 0) {
        ssize_t n = write(c->fd, c->tx, c->tx_len);
        if (n > 0) {
            memmove(c->tx, c->tx + n, c->tx_len - n);
            c->tx_len -= n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            if (n < 0 && errno != EAGAIN) {
                logmsg("channel write: %s", strerror(errno));
                c->tx_len = 0;
            }
            return; /* EAGAIN: poll for POLLOUT */
        }
    }
}

/* The last TX_RESERVE bytes of the queue are kept for Exited, so a host that
 * stops reading (Pong backlog) cannot crowd out the final report. */
#define TX_RESERVE 256

static void chan_send(struct chan *c, const GuestMessage *m)
{
    uint8_t buf[512];
    if (c->fd < 0 || !c->host_up) return; /* nobody listening */
    size_t cap = sizeof c->tx;
    if (m->which_msg != flexcap_guest_v1_GuestMessage_exited_tag) cap -= TX_RESERVE;
    pb_ostream_t os = pb_ostream_from_buffer(buf + 4, sizeof buf - 4);
    if (!pb_encode(&os, flexcap_guest_v1_GuestMessage_fields, m)) {
        logmsg("encode: %s", PB_GET_ERROR(&os));
        return;
    }
    uint32_t n = (uint32_t)os.bytes_written;
    buf[0] = n >> 24; buf[1] = n >> 16; buf[2] = n >> 8; buf[3] = n;
    if (c->tx_len + 4 + n > cap) {
        if (!c->backlog_logged) logmsg("host is not reading; dropping frames");
        c->backlog_logged = true;
        return;
    }
    c->backlog_logged = false;
    memcpy(c->tx + c->tx_len, buf, 4 + n);
    c->tx_len += 4 + n;
    chan_flush(c);
}

static void send_hello(struct chan *c)
{
    GuestMessage m = flexcap_guest_v1_GuestMessage_init_zero;
    m.which_msg = flexcap_guest_v1_GuestMessage_hello_tag;
    m.msg.hello.protocol_version = FLEXCAP_PROTOCOL_VERSION;
    snprintf(m.msg.hello.build_id, sizeof m.msg.hello.build_id, "%s", CAPSULE_INIT_BUILD_ID);
    c->hellos_pending++;
    c->last_hello_ms = now_ms();
    chan_send(c, &m);
}

/* Look at the port's host side; start or drop a session on a change. */
static void chan_check_host(struct chan *c)
{
    if (c->fd < 0) return;
    struct pollfd p = { .fd = c->fd, .events = POLLIN };
    if (poll(&p, 1, 0) < 0) return;
    bool up = !(p.revents & POLLHUP);
    if (up == c->host_up) return;
    c->host_up = up;
    chan_reset_session(c);
    if (up) {
        logmsg("host connected; sending Hello");
        send_hello(c);
    } else {
        logmsg("host disconnected");
    }
}

static bool find_port(char *dev, size_t devlen)
{
    bool found = false;
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return false;
    struct dirent *e;
    while (!found && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[PATH_MAX], name[128] = "";
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, name, sizeof name - 1);
        close(fd);
        if (n <= 0) continue;
        name[n] = 0;
        name[strcspn(name, "\n")] = 0;
        if (strcmp(name, FLEXCAP_OS_PORT_NAME) == 0) {
            snprintf(dev, devlen, "/dev/%s", e->d_name);
            found = true;
        }
    }
    closedir(d);
    return found;
}

static void chan_try_open(struct chan *c)
{
    char dev[PATH_MAX];
    if (c->fd >= 0 || !find_port(dev, sizeof dev)) return;
    static bool open_failed_logged;
    int fd = open(dev, O_RDWR | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) {
        if (!open_failed_logged) logmsg("open %s: %s", dev, strerror(errno));
        open_failed_logged = true;
        return;
    }
    /* virtio_console raises SIGIO (collected through the signalfd) on data
     * and whenever the host end opens or closes. */
    fcntl(fd, F_SETOWN, getpid());
    fcntl(fd, F_SETFL, O_RDWR | O_NONBLOCK | O_ASYNC);
    c->fd = fd;
    c->host_up = false;
    chan_reset_session(c);
    logmsg("channel %s on %s", FLEXCAP_OS_PORT_NAME, dev);
    chan_check_host(c);
}

static void begin_shutdown(uint32_t grace_ms, const char *why)
{
    if (app_pid <= 0 || app_done) return;
    int64_t deadline = now_ms() + grace_ms;
    if (!term_sent) {
        logmsg("%s: SIGTERM to app (pid %d), SIGKILL in %u ms", why, (int)app_pid, grace_ms);
        kill(app_pid, SIGTERM);
        term_sent = true;
        kill_deadline = deadline;
    } else if (deadline < kill_deadline) {
        kill_deadline = deadline; /* a later, shorter grace wins */
    }
}

static void handle_frame(struct chan *c, const uint8_t *buf, size_t len)
{
    HostMessage m = flexcap_guest_v1_HostMessage_init_zero;
    pb_istream_t is = pb_istream_from_buffer(buf, len);
    if (!pb_decode(&is, flexcap_guest_v1_HostMessage_fields, &m)) {
        logmsg("bad host frame (%zu bytes): %s", len, PB_GET_ERROR(&is));
        return;
    }
    if (m.which_msg == flexcap_guest_v1_HostMessage_hello_reply_tag) {
        const flexcap_guest_v1_HelloReply *r = &m.msg.hello_reply;
        if (c->hellos_pending == 0) { /* rule c) */
            logmsg("unsolicited HelloReply; sending Hello again");
            send_hello(c);
            return;
        }
        c->hellos_pending--;
        c->accepted = r->accepted;
        if (r->accepted)
            logmsg("host accepted session");
        else
            logmsg("host refused session: %s", r->reason[0] ? r->reason : "(no reason)");
        return;
    }
    if (!c->accepted && now_ms() - c->last_hello_ms >= HELLO_RESEND_MS) /* rule b) */
        send_hello(c);
    switch (m.which_msg) {
    case flexcap_guest_v1_HostMessage_ping_tag: {
        GuestMessage out = flexcap_guest_v1_GuestMessage_init_zero;
        out.which_msg = flexcap_guest_v1_GuestMessage_pong_tag;
        out.msg.pong.nonce = m.msg.ping.nonce;
        chan_send(c, &out);
        break;
    }
    case flexcap_guest_v1_HostMessage_shutdown_tag:
        begin_shutdown(m.msg.shutdown.grace_ms, "host requested shutdown");
        break;
    default:
        logmsg("ignoring unknown host message");
    }
}

/* Feed received bytes through the framing state machine. */
static void chan_on_bytes(struct chan *c, const uint8_t *p, size_t n)
{
    while (n > 0) {
        size_t take;
        if (c->discard > 0) { /* resync: skip the oversized frame's body */
            take = n < c->discard ? n : c->discard;
            c->discard -= take;
        } else if (c->hdr_got < FLEXCAP_FRAME_HEADER_BYTES) {
            take = FLEXCAP_FRAME_HEADER_BYTES - c->hdr_got;
            if (take > n) take = n;
            memcpy(c->hdr + c->hdr_got, p, take);
            c->hdr_got += take;
            if (c->hdr_got == FLEXCAP_FRAME_HEADER_BYTES) {
                uint32_t len = (uint32_t)c->hdr[0] << 24 | (uint32_t)c->hdr[1] << 16 |
                               (uint32_t)c->hdr[2] << 8 | c->hdr[3];
                if (len > FLEXCAP_MAX_FRAME_BYTES) {
                    logmsg("host frame of %u bytes exceeds %u; discarding it, new session",
                           len, FLEXCAP_MAX_FRAME_BYTES);
                    c->discard = len;
                    c->hdr_got = 0;
                    c->accepted = false;
                    send_hello(c); /* start over: the host sees a fresh Hello */
                } else {
                    c->need = len;
                    c->got = 0;
                }
            }
        } else {
            take = c->need - c->got;
            if (take > n) take = n;
            memcpy(c->rx + c->got, p, take);
            c->got += take;
        }
        p += take;
        n -= take;
        /* A complete frame (possibly empty, so checked even when n == 0). */
        if (c->discard == 0 && c->hdr_got == FLEXCAP_FRAME_HEADER_BYTES && c->got == c->need) {
            c->hdr_got = 0;
            handle_frame(c, c->rx, c->need);
        }
    }
}

static void chan_read(struct chan *c)
{
    uint8_t buf[4096];
    /* Bounded, so a flooding host cannot starve reaping and timers; poll()
     * reports the rest next round. */
    for (int round = 0; round < 16; round++) {
        ssize_t n = read(c->fd, buf, sizeof buf);
        if (n > 0) {
            chan_on_bytes(c, buf, n);
            if (c->fd < 0 || !c->host_up) return;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            /* 0 = host end closed (EOF); EAGAIN = drained. */
            if (n < 0 && errno != EAGAIN) logmsg("channel read: %s", strerror(errno));
            chan_check_host(c);
            return;
        }
    }
}

/* ------------------------------------------------------------------- app */

static pid_t spawn_app(const LaunchConfig *cfg)
{
    if (cfg->argv_count == 0 || !cfg->argv[0] || !cfg->argv[0][0]) {
        logmsg("LaunchConfig has no argv");
        return -1;
    }
    char **argv = calloc(cfg->argv_count + 1, sizeof *argv);
    char **envp = calloc(cfg->env_count + 2, sizeof *envp);
    if (!argv || !envp) return -1;
    for (pb_size_t i = 0; i < cfg->argv_count; i++) argv[i] = cfg->argv[i] ? cfg->argv[i] : "";
    bool has_path = false;
    pb_size_t ne = 0;
    for (pb_size_t i = 0; i < cfg->env_count; i++) {
        if (!cfg->env[i]) continue;
        if (strncmp(cfg->env[i], "PATH=", 5) == 0) has_path = true;
        envp[ne++] = cfg->env[i];
    }
    if (!has_path) envp[ne++] = DEFAULT_PATH;

    pid_t pid = fork();
    if (pid < 0) {
        logmsg("fork: %s", strerror(errno));
    } else if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setsid();
        int in = open("/dev/null", O_RDONLY);
        int out = open("/dev/console", O_WRONLY | O_NOCTTY);
        if (in >= 0) dup2(in, 0);
        if (out >= 0) { dup2(out, 1); dup2(out, 2); }
        if (in > 2) close(in);
        if (out > 2) close(out);
        if (chdir("/") < 0) {}
        execve(argv[0], argv, envp);
        logmsg("exec %s: %s", argv[0], strerror(errno));
        _exit(127);
    } else {
        logmsg("started %s (pid %d)", argv[0], (int)pid);
    }
    free(argv);
    free(envp);
    return pid;
}

static void reap(void)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        if (pid == app_pid) {
            app_done = true;
            app_status = st;
        }
    }
}

static void send_exited_and_flush(int status)
{
    GuestMessage m = flexcap_guest_v1_GuestMessage_init_zero;
    m.which_msg = flexcap_guest_v1_GuestMessage_exited_tag;
    if (WIFSIGNALED(status)) {
        m.msg.exited.signal = WTERMSIG(status);
        logmsg("app killed by signal %d", WTERMSIG(status));
    } else {
        m.msg.exited.exit_code = WEXITSTATUS(status);
        logmsg("app exited with code %d", WEXITSTATUS(status));
    }
    chan_check_host(&ch);
    if (ch.fd < 0 || !ch.host_up) {
        logmsg("host not connected; Exited not delivered");
        return;
    }
    chan_send(&ch, &m);
    int64_t deadline = now_ms() + EXIT_FLUSH_MS;
    while (ch.tx_len > 0 && ch.host_up) {
        int64_t left = deadline - now_ms();
        if (left <= 0) { logmsg("timed out sending Exited"); return; }
        struct pollfd p = { .fd = ch.fd, .events = POLLOUT };
        if (poll(&p, 1, (int)left) > 0) {
            if (p.revents & POLLHUP) chan_check_host(&ch);
            else chan_flush(&ch);
        }
    }
}

static void __attribute__((noreturn)) power_off(void)
{
    logmsg("powering off");
    sync();
    reboot(RB_POWER_OFF);
    /* Only returns on failure; QEMU runs with -no-reboot, so a reboot also
     * ends the VM. */
    logmsg("power off failed: %s; rebooting", strerror(errno));
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    if (getpid() != 1) {
        fprintf(stderr, "capsule-init: must run as PID 1\n");
        return 1;
    }
    umask(022);
    mount_filesystems();
    logmsg("starting, build %s", CAPSULE_INIT_BUILD_ID);
    load_modules();

    LaunchConfig cfg = flexcap_guest_v1_LaunchConfig_init_zero;
    bool have_cfg = read_launch_config(&cfg);

    const char *host = (have_cfg && cfg.capsule_id && cfg.capsule_id[0]) ? cfg.capsule_id : "capsule";
    if (sethostname(host, strnlen(host, 64)) < 0) logmsg("sethostname: %s", strerror(errno));
    setup_network(&cfg);

    /* All signals PID 1 cares about go through a signalfd. */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGIO);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGPWR);
    sigaddset(&mask, SIGHUP);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) logmsg("signalfd: %s", strerror(errno));

    /* virtio-serial ports are announced asynchronously after the driver
     * loads; give the port a moment so early Exited frames are not lost. */
    int64_t port_deadline = now_ms() + (virtio_device_present(VIRTIO_ID_CONSOLE) ? PORT_WAIT_MS : 0);
    for (chan_try_open(&ch); ch.fd < 0 && now_ms() < port_deadline; chan_try_open(&ch))
        sleep_ms(20);
    if (ch.fd < 0) logmsg("no %s port; running without host channel", FLEXCAP_OS_PORT_NAME);

    if (have_cfg) app_pid = spawn_app(&cfg);
    if (app_pid < 0) { /* nothing to run: report like a failed exec */
        app_done = true;
        app_status = 127 << 8;
    }

    int64_t next_recheck = now_ms() + RECHECK_MS;
    while (!app_done) {
        int64_t now = now_ms();
        if (kill_deadline && now >= kill_deadline) {
            logmsg("grace period over: SIGKILL to app (pid %d)", (int)app_pid);
            kill(app_pid, SIGKILL);
            kill_deadline = 0;
        }
        if (now >= next_recheck) {
            chan_try_open(&ch);
            chan_check_host(&ch);
            next_recheck = now + RECHECK_MS;
        }
        int64_t wake = next_recheck;
        if (kill_deadline && kill_deadline < wake) wake = kill_deadline;
        int timeout = (int)(wake > now ? wake - now : 0);

        struct pollfd pfd[2];
        int n = 0;
        pfd[n++] = (struct pollfd){ .fd = sfd, .events = POLLIN };
        /* While the host end is closed the port reports POLLHUP|POLLIN
         * forever; leave it out then and rely on SIGIO + the recheck. */
        bool port_polled = ch.fd >= 0 && ch.host_up;
        if (port_polled)
            pfd[n++] = (struct pollfd){ .fd = ch.fd, .events = POLLIN | (ch.tx_len ? POLLOUT : 0) };

        if (poll(pfd, n, timeout) < 0 && errno != EINTR) {
            logmsg("poll: %s", strerror(errno));
            sleep_ms(100);
            continue;
        }

        if (pfd[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            bool sigio = false;
            while (read(sfd, &si, sizeof si) == sizeof si) {
                switch (si.ssi_signo) {
                case SIGCHLD: break; /* reaped below */
                case SIGIO: sigio = true; break;
                case SIGTERM: case SIGINT: case SIGPWR:
                    begin_shutdown(SIGNAL_GRACE_MS, "init got a stop signal");
                    break;
                default: break;
                }
            }
            if (sigio) chan_check_host(&ch);
        }
        if (port_polled && ch.fd >= 0) {
            short re = pfd[1].revents;
            if (re & POLLHUP) chan_check_host(&ch);
            else {
                if (re & POLLIN) chan_read(&ch);
                if ((re & POLLOUT) && ch.host_up) chan_flush(&ch);
            }
        }
        reap();
    }

    send_exited_and_flush(app_status);
    power_off();
}
