#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "appout.h"
#include "chan.h"
#include "flexcap_wire.h"
#include "util.h"

/* After a chunk smaller than the maximum, wait this long before reading that
 * pipe again, so an app writing line by line produces at most ~100 frames a
 * second per stream (the host rate-limits frames) instead of one per line. */
#define LOG_COALESCE_MS 10
/* A full transmit queue holds output back (the app blocks on its pipe) this
 * long before it goes to the console instead: a briefly busy host loses
 * nothing, a stuck one cannot stall the app. */
#define LOG_STALL_MS 500

struct stream {
    int fd;                /* read end, -1 after EOF */
    int tag;               /* LogStream */
    bool empty;            /* the last read found the pipe empty */
    bool wait_console;     /* the console refused bytes (EAGAIN) */
    int64_t hold_until;    /* LOG_COALESCE_MS after a small chunk */
    int64_t stall_since;   /* when the queue was first found full, 0 if not */
    size_t len, off;       /* buf[off, len) is still to deliver */
    uint8_t *buf;
};

/* Separate from the initialized array so they stay in .bss, not in the binary. */
static uint8_t bufs[2][FLEXCAP_MAX_LOG_CHUNK];
static struct stream streams[2] = { { .fd = -1, .buf = bufs[0] }, { .fd = -1, .buf = bufs[1] } };
static int console_fd = -1;

void appout_init(int out_fd, int err_fd)
{
    streams[0].fd = out_fd;
    streams[0].tag = flexcap_guest_v1_LogStream_LOG_STREAM_STDOUT;
    streams[1].fd = err_fd;
    streams[1].tag = flexcap_guest_v1_LogStream_LOG_STREAM_STDERR;
    /* A separate, non-blocking open: PID 1 must not block on a slow console. */
    if (console_fd < 0) console_fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
    if (console_fd < 0) logmsg("/dev/console: %s; app output without host is lost", strerror(errno));
}

int appout_pollfds(struct pollfd *p, int64_t now)
{
    int n = 0;
    bool console = false;
    for (int i = 0; i < 2; i++) {
        struct stream *s = &streams[i];
        if (s->len == 0 && s->fd >= 0 && s->hold_until <= now)
            p[n++] = (struct pollfd){ .fd = s->fd, .events = POLLIN };
        else if (s->len > 0 && s->wait_console)
            console = true;
    }
    if (console) p[n++] = (struct pollfd){ .fd = console_fd, .events = POLLOUT };
    return n;
}

int64_t appout_deadline(int64_t now)
{
    int64_t t = INT64_MAX;
    for (int i = 0; i < 2; i++) {
        const struct stream *s = &streams[i];
        if (s->len == 0 && s->fd >= 0 && s->hold_until > now && s->hold_until < t) t = s->hold_until;
        if (s->len > 0 && s->stall_since && !s->wait_console && s->stall_since + LOG_STALL_MS < t)
            t = s->stall_since + LOG_STALL_MS;
    }
    return t;
}

/* Delivers buf[off, len); false when it has to wait (queue or console). */
static bool deliver(struct stream *s, int64_t now, bool draining)
{
    s->wait_console = false;
    /* A chunk the console has partly taken stays on the console. */
    if (s->off == 0) {
        switch (chan_send_log(s->tag, s->buf, s->len)) {
        case LOG_SENT:
            s->len = 0;
            s->stall_since = 0;
            return true;
        case LOG_NO_SESSION:
            s->stall_since = 0;
            break;
        case LOG_QUEUE_FULL:
            /* Once stalled past the limit, later chunks go to the console at
             * once until the queue has room again. */
            if (!s->stall_since) s->stall_since = now;
            if (!draining && now - s->stall_since < LOG_STALL_MS) return false;
            break;
        }
    }
    while (s->off < s->len) {
        ssize_t n = console_fd >= 0 ? write(console_fd, s->buf + s->off, s->len - s->off) : -1;
        if (n > 0) {
            s->off += n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            s->wait_console = true;
            return false;
        } else {
            break; /* no console at all: nowhere to put the bytes */
        }
    }
    s->len = s->off = 0;
    return true;
}

static void pump(struct stream *s, int64_t now, bool draining)
{
    /* Bounded, so a chatty app cannot starve the rest of the loop. */
    for (int round = 0; round < 8; round++) {
        if (s->len == 0) {
            if (s->fd < 0 || (!draining && now < s->hold_until)) return;
            ssize_t n = read(s->fd, s->buf, FLEXCAP_MAX_LOG_CHUNK);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && errno == EAGAIN) {
                s->empty = true;
                return;
            }
            if (n <= 0) { /* EOF: every writer is gone */
                if (n < 0) logmsg("app output: %s", strerror(errno));
                close(s->fd);
                s->fd = -1;
                return;
            }
            s->empty = false;
            s->len = (size_t)n;
            s->off = 0;
            s->hold_until = (size_t)n < FLEXCAP_MAX_LOG_CHUNK ? now + LOG_COALESCE_MS : 0;
        }
        if (!deliver(s, now, draining)) return;
    }
}

void appout_pump(int64_t now, bool draining)
{
    for (int i = 0; i < 2; i++) pump(&streams[i], now, draining);
}

bool appout_drained(void)
{
    for (int i = 0; i < 2; i++) {
        const struct stream *s = &streams[i];
        if (s->len > 0 || (s->fd >= 0 && !s->empty)) return false;
    }
    return true;
}
