/*
 * Protocol: frames are a 4-byte big-endian length + protobuf (HostMessage in,
 * GuestMessage out), see proto/flexcap/guest/v1/guest.proto. All channel I/O
 * is non-blocking.
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
 *   e) when the host sends Resync, its first frame on every new connection;
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
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <pb_decode.h>
#include <pb_encode.h>

#include "chan.h"
#include "flexcap_wire.h"
#include "util.h"

#define HELLO_RESEND_MS 1000 /* rule b) rate limit */
/* Room for a few full Log frames, so output keeps flowing while the host
 * drains the port, plus control frames. */
#define TX_CAP (80 * 1024)
#define TX_EXIT_RESERVE 256  /* only Exited may use these last bytes */
#define TX_LOG_RESERVE 4096  /* Log frames leave this for Pong, Ports, NetworkApplied */
/* Each write() to the port becomes one buffer in the guest kernel, and the
 * virtqueue holds 128 of them while the host is not reading: small writes
 * bound that memory (~512 KiB), which matters in a 32 MiB guest. */
#define PORT_WRITE_MAX 1024

static struct {
    int fd;                  /* -1 while the port is not open */
    bool host_up;            /* host end connected, as last observed */
    unsigned hellos_pending; /* Hellos sent on this connection, not yet answered */
    bool accepted;           /* HelloReply{accepted} received on this connection */
    unsigned sessions;       /* accepted HelloReplies so far */
    int64_t last_hello_ms;
    void (*on_message)(const HostMessage *m);
    /* receive state: header, then payload (or discarding an oversized one) */
    uint8_t hdr[FLEXCAP_FRAME_HEADER_BYTES];
    size_t hdr_got;
    uint32_t need, got, discard;
    /* transmit queue of whole frames: bytes tx[tx_off, tx_len) are unsent */
    size_t tx_off, tx_len;
    bool backlog_logged;
} c = { .fd = -1 };
/* Outside the initialized struct so they stay in .bss, not in the binary. */
static uint8_t rx[FLEXCAP_MAX_FRAME_BYTES];
static uint8_t tx[TX_CAP];

void chan_init(void (*on_message)(const HostMessage *m))
{
    c.on_message = on_message;
}

bool chan_is_open(void) { return c.fd >= 0; }
bool chan_accepted(void) { return c.fd >= 0 && c.host_up && c.accepted; }
bool chan_hello_pending(void) { return c.fd >= 0 && c.host_up && !c.accepted && c.hellos_pending > 0; }
unsigned chan_session_count(void) { return c.sessions; }

static void reset_session(void)
{
    c.hdr_got = 0;
    c.need = c.got = c.discard = 0;
    c.tx_off = c.tx_len = 0;
    c.hellos_pending = 0;
    c.accepted = false;
}

static void flush(void)
{
    while (c.fd >= 0 && c.tx_off < c.tx_len) {
        size_t len = c.tx_len - c.tx_off;
        ssize_t n = write(c.fd, tx + c.tx_off, len < PORT_WRITE_MAX ? len : PORT_WRITE_MAX);
        if (n > 0) {
            c.tx_off += n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            if (n < 0 && errno != EAGAIN) {
                logmsg("channel write: %s", strerror(errno));
                c.tx_off = c.tx_len;
            }
            break; /* EAGAIN: poll for POLLOUT */
        }
    }
    if (c.tx_off == c.tx_len) c.tx_off = c.tx_len = 0;
}

/* Encodes m into the queue, keeping `reserve` bytes free; false if no room. */
static bool enqueue(const GuestMessage *m, size_t reserve)
{
    if (c.fd < 0 || !c.host_up) return false; /* nobody listening */
    size_t hdr = FLEXCAP_FRAME_HEADER_BYTES;
    if (c.tx_off > 0 && TX_CAP - c.tx_len < reserve + hdr + flexcap_guest_v1_GuestMessage_size) {
        memmove(tx, tx + c.tx_off, c.tx_len - c.tx_off);
        c.tx_len -= c.tx_off;
        c.tx_off = 0;
    }
    if (c.tx_len + reserve + hdr >= TX_CAP) return false;
    size_t room = TX_CAP - reserve - hdr - c.tx_len;
    pb_ostream_t os = pb_ostream_from_buffer(tx + c.tx_len + hdr, room);
    if (!pb_encode(&os, flexcap_guest_v1_GuestMessage_fields, m)) {
        /* With room for the largest message, failing is a bug, not a full queue. */
        if (room >= flexcap_guest_v1_GuestMessage_size) logmsg("encode: %s", PB_GET_ERROR(&os));
        return false;
    }
    uint32_t n = (uint32_t)os.bytes_written;
    uint8_t *h = tx + c.tx_len;
    h[0] = n >> 24; h[1] = n >> 16; h[2] = n >> 8; h[3] = n;
    c.tx_len += hdr + n;
    flush();
    return true;
}

bool chan_send(const GuestMessage *m)
{
    bool exited = m->which_msg == flexcap_guest_v1_GuestMessage_exited_tag;
    bool ok = enqueue(m, exited ? 0 : TX_EXIT_RESERVE);
    if (!ok && c.fd >= 0 && c.host_up && !c.backlog_logged) logmsg("host is not reading; dropping frames");
    c.backlog_logged = !ok && c.fd >= 0 && c.host_up;
    return ok;
}

enum log_send chan_send_log(int stream, const uint8_t *data, size_t len)
{
    static GuestMessage m; /* 16 KiB: static rather than on the stack each time */
    if (!chan_accepted()) return LOG_NO_SESSION;
    if (len > sizeof m.msg.log.data.bytes) len = sizeof m.msg.log.data.bytes;
    m.which_msg = flexcap_guest_v1_GuestMessage_log_tag;
    m.msg.log.stream = (flexcap_guest_v1_LogStream)stream;
    m.msg.log.data.size = (pb_size_t)len;
    memcpy(m.msg.log.data.bytes, data, len);
    return enqueue(&m, TX_LOG_RESERVE) ? LOG_SENT : LOG_QUEUE_FULL;
}

static void send_hello(void)
{
    GuestMessage m = flexcap_guest_v1_GuestMessage_init_zero;
    m.which_msg = flexcap_guest_v1_GuestMessage_hello_tag;
    m.msg.hello.protocol_version = FLEXCAP_PROTOCOL_VERSION;
    snprintf(m.msg.hello.build_id, sizeof m.msg.hello.build_id, "%s", CAPSULE_INIT_BUILD_ID);
    c.hellos_pending++;
    c.last_hello_ms = now_ms();
    chan_send(&m);
}

void chan_check_host(void)
{
    if (c.fd < 0) return;
    struct pollfd p = { .fd = c.fd, .events = POLLIN };
    if (poll(&p, 1, 0) < 0) return;
    bool up = !(p.revents & POLLHUP);
    if (up == c.host_up) return;
    c.host_up = up;
    reset_session();
    if (up) {
        logmsg("host connected; sending Hello");
        send_hello();
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
        char path[PATH_MAX], name[128];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        if (read_small_file(path, name, sizeof name) <= 0) continue;
        name[strcspn(name, "\n")] = 0;
        if (strcmp(name, FLEXCAP_OS_PORT_NAME) == 0) {
            snprintf(dev, devlen, "/dev/%s", e->d_name);
            found = true;
        }
    }
    closedir(d);
    return found;
}

void chan_try_open(void)
{
    char dev[PATH_MAX];
    if (c.fd >= 0 || !find_port(dev, sizeof dev)) return;
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
    c.fd = fd;
    c.host_up = false;
    reset_session();
    logmsg("channel %s on %s", FLEXCAP_OS_PORT_NAME, dev);
    chan_check_host();
}

static void handle_frame(const uint8_t *buf, size_t len)
{
    HostMessage m = flexcap_guest_v1_HostMessage_init_zero;
    pb_istream_t is = pb_istream_from_buffer(buf, len);
    if (!pb_decode(&is, flexcap_guest_v1_HostMessage_fields, &m)) {
        logmsg("bad host frame (%zu bytes): %s", len, PB_GET_ERROR(&is));
        return;
    }
    if (m.which_msg == flexcap_guest_v1_HostMessage_resync_tag) { /* rule e) */
        send_hello();
        return;
    }
    if (m.which_msg == flexcap_guest_v1_HostMessage_hello_reply_tag) {
        const flexcap_guest_v1_HelloReply *r = &m.msg.hello_reply;
        if (c.hellos_pending == 0) { /* rule c) */
            logmsg("unsolicited HelloReply; sending Hello again");
            send_hello();
            return;
        }
        c.hellos_pending--;
        c.accepted = r->accepted;
        if (r->accepted) {
            c.sessions++;
            logmsg("host accepted session");
        } else {
            logmsg("host refused session: %s", r->reason[0] ? r->reason : "(no reason)");
        }
        return;
    }
    if (!c.accepted && now_ms() - c.last_hello_ms >= HELLO_RESEND_MS) /* rule b) */
        send_hello();
    if (c.on_message) c.on_message(&m);
}

/* Feeds received bytes through the framing state machine. */
static void on_bytes(const uint8_t *p, size_t n)
{
    while (n > 0) {
        size_t take;
        if (c.discard > 0) { /* resync: skip the oversized frame's body */
            take = n < c.discard ? n : c.discard;
            c.discard -= take;
        } else if (c.hdr_got < FLEXCAP_FRAME_HEADER_BYTES) {
            take = FLEXCAP_FRAME_HEADER_BYTES - c.hdr_got;
            if (take > n) take = n;
            memcpy(c.hdr + c.hdr_got, p, take);
            c.hdr_got += take;
            if (c.hdr_got == FLEXCAP_FRAME_HEADER_BYTES) {
                uint32_t len = (uint32_t)c.hdr[0] << 24 | (uint32_t)c.hdr[1] << 16 |
                               (uint32_t)c.hdr[2] << 8 | c.hdr[3];
                if (len > FLEXCAP_MAX_FRAME_BYTES) {
                    logmsg("host frame of %u bytes exceeds %u; discarding it, new session",
                           len, FLEXCAP_MAX_FRAME_BYTES);
                    c.discard = len;
                    c.hdr_got = 0;
                    c.accepted = false;
                    send_hello(); /* rule d) */
                } else {
                    c.need = len;
                    c.got = 0;
                }
            }
        } else {
            take = c.need - c.got;
            if (take > n) take = n;
            memcpy(rx + c.got, p, take);
            c.got += take;
        }
        p += take;
        n -= take;
        /* A complete frame (possibly empty, so checked even when n == 0). */
        if (c.discard == 0 && c.hdr_got == FLEXCAP_FRAME_HEADER_BYTES && c.got == c.need) {
            c.hdr_got = 0;
            handle_frame(rx, c.need);
        }
    }
}

static void read_port(void)
{
    uint8_t buf[4096];
    /* Bounded, so a flooding host cannot starve reaping and timers; poll()
     * reports the rest next round. */
    for (int round = 0; round < 16; round++) {
        ssize_t n = read(c.fd, buf, sizeof buf);
        if (n > 0) {
            on_bytes(buf, n);
            if (c.fd < 0 || !c.host_up) return;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            /* 0 = host end closed (EOF); EAGAIN = drained. */
            if (n < 0 && errno != EAGAIN) logmsg("channel read: %s", strerror(errno));
            chan_check_host();
            return;
        }
    }
}

bool chan_pollfd(struct pollfd *p)
{
    /* While the host end is closed the port reports POLLHUP|POLLIN forever;
     * leave it out then and rely on SIGIO + the periodic recheck. */
    if (c.fd < 0 || !c.host_up) return false;
    *p = (struct pollfd){ .fd = c.fd, .events = POLLIN | (c.tx_len > c.tx_off ? POLLOUT : 0) };
    return true;
}

void chan_on_poll(short re)
{
    if (c.fd < 0 || !c.host_up) return;
    if (re & POLLHUP) {
        chan_check_host();
        return;
    }
    if (re & POLLIN) read_port();
    if ((re & POLLOUT) && c.host_up) flush();
}

bool chan_drain(int timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;
    while (c.fd >= 0 && c.host_up && c.tx_off < c.tx_len) {
        int64_t left = deadline - now_ms();
        if (left <= 0) return false;
        struct pollfd p = { .fd = c.fd, .events = POLLOUT };
        if (poll(&p, 1, (int)left) > 0) {
            if (p.revents & POLLHUP) chan_check_host();
            else flush();
        }
    }
    return c.fd >= 0 && c.host_up && c.tx_off == c.tx_len;
}
