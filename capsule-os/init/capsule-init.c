/*
 * capsule-init: PID 1 of a FlexCapsule guest (QEMU microvm).
 *
 * Boot sequence:
 *   1. mount /dev, /proc, /sys, /tmp, /run, /dev/pts, /dev/shm     (boot.c)
 *   2. load FLEXCAP_MODULE_DIR/\*.ko in lexical order, if any      (boot.c)
 *   3. flexcap.* keys of /proc/cmdline; LaunchConfig from fw_cfg  (fwcfg.c)
 *   4. flexcap.root=DEV: mount the app's read-only erofs root on
 *      APP_ROOT_DIR with its own proc, sys, dev, tmp and run      (boot.c)
 *   5. hostname = capsule_id; lo up; eth0 from flexcap.ip/gw/dns  (net.c)
 *   6. open the virtio-serial port FLEXCAP_OS_PORT_NAME, if any   (chan.c)
 *   7. fork+exec the app (chroot'ed when it has its own root)     (app.c)
 *   8. serve the host in one poll() loop: Ping, Shutdown, SetNetwork; the
 *      app's output as Log frames (appout.c); its listening ports as Ports
 *      (listen.c); reap zombies. Nothing in the loop blocks.
 *   9. when the app exits: drain its output, send Exited, power off.
 *
 * After every accepted HelloReply the guest sends a full Ports snapshot
 * first, then Log frames as output arrives.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "app.h"
#include "appout.h"
#include "boot.h"
#include "chan.h"
#include "flexcap_wire.h"
#include "fwcfg.h"
#include "listen.h"
#include "net.h"
#include "util.h"

#define PORT_WAIT_MS 2000     /* at boot, wait this long for the port to appear */
#define NET_WAIT_MS 3000      /* ... and for eth0 */
#define RECHECK_MS 1000       /* rescan for the port / host end this often */
#define LISTEN_SCAN_MS 100    /* look for listening sockets this often */
#define OUTPUT_DRAIN_MS 2000  /* after the app exited, how long its output (and a
                                 session being set up) may take */
#define EXIT_FLUSH_MS 2000    /* how long Exited may take to drain */
#define SIGNAL_GRACE_MS 10000 /* grace when PID 1 itself gets SIGTERM/SIGPWR */

typedef flexcap_guest_v1_LaunchConfig LaunchConfig;

/* ----------------------------------------------------------------- ports */

static struct listen_set ports;   /* as last scanned */
static bool ports_unsent;         /* the host has not got `ports` yet */
static unsigned ports_session;    /* chan_session_count() of the last snapshot */
static int64_t next_scan;

static void send_ports(void)
{
    GuestMessage m = flexcap_guest_v1_GuestMessage_init_zero;
    m.which_msg = flexcap_guest_v1_GuestMessage_ports_tag;
    m.msg.ports.listening_count = (pb_size_t)ports.n;
    for (unsigned i = 0; i < ports.n; i++) {
        m.msg.ports.listening[i].port = ports.e[i].port;
        m.msg.ports.listening[i].protocol = (flexcap_guest_v1_Protocol)ports.e[i].proto;
    }
    if (chan_send(&m)) ports_unsent = false; /* else retried on the next wakeup */
}

/* Scans only while someone can hear about it; a new session gets a fresh
 * scan and a full snapshot even if nothing changed. */
static void ports_tick(int64_t now)
{
    if (!chan_accepted()) return;
    if (chan_session_count() != ports_session) {
        ports_session = chan_session_count();
        ports_unsent = true;
        next_scan = now;
    }
    if (now >= next_scan) {
        struct listen_set cur;
        listen_scan(&cur);
        if (!listen_equal(&cur, &ports)) {
            ports = cur;
            ports_unsent = true;
        }
        next_scan = now + LISTEN_SCAN_MS;
    }
    if (ports_unsent) send_ports();
}

/* ---------------------------------------------------------- host messages */

static void set_network(const flexcap_guest_v1_SetNetwork *req)
{
    GuestMessage out = flexcap_guest_v1_GuestMessage_init_zero;
    out.which_msg = flexcap_guest_v1_GuestMessage_network_applied_tag;
    flexcap_guest_v1_NetworkApplied *r = &out.msg.network_applied;
    r->request_id = req->request_id;
    if (!req->has_net)
        snprintf(r->error, sizeof r->error, "SetNetwork without net");
    else if (net_apply(req->net.address_cidr, req->net.gateway, req->net.dns, 0, r->error, sizeof r->error))
        r->error[0] = 0;
    if (r->error[0]) logmsg("SetNetwork %llu: %s", (unsigned long long)req->request_id, r->error);
    chan_send(&out);
}

static void on_host_message(const HostMessage *m)
{
    switch (m->which_msg) {
    case flexcap_guest_v1_HostMessage_ping_tag: {
        GuestMessage out = flexcap_guest_v1_GuestMessage_init_zero;
        out.which_msg = flexcap_guest_v1_GuestMessage_pong_tag;
        out.msg.pong.nonce = m->msg.ping.nonce;
        chan_send(&out);
        break;
    }
    case flexcap_guest_v1_HostMessage_shutdown_tag:
        app_stop(m->msg.shutdown.grace_ms, "host requested shutdown");
        break;
    case flexcap_guest_v1_HostMessage_set_network_tag:
        set_network(&m->msg.set_network);
        break;
    default:
        logmsg("ignoring unknown host message");
    }
}

/* ------------------------------------------------------------------- end */

static void send_exited(int status)
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
    chan_check_host();
    if (!chan_send(&m)) {
        logmsg("host not connected; Exited not delivered");
        return;
    }
    if (!chan_drain(EXIT_FLUSH_MS)) logmsg("timed out sending Exited");
}

static void __attribute__((noreturn)) power_off(void)
{
    /* Without ACPI (acpi=off, or a kernel built without it) the kernel cannot
     * power off and RB_POWER_OFF merely halts, leaving QEMU running. QEMU
     * runs with -no-reboot, so a reboot ends the VM just as well. */
    bool acpi = access("/sys/firmware/acpi", F_OK) == 0;
    logmsg("%s", acpi ? "powering off" : "no ACPI: ending the VM by reboot (QEMU runs with -no-reboot)");
    sync();
    reboot(acpi ? RB_POWER_OFF : RB_AUTOBOOT);
    logmsg("power off failed: %s; rebooting", strerror(errno));
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}

/* ------------------------------------------------------------------ main */

static int signals_init(void)
{
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
    return sfd;
}

static void read_signals(int sfd)
{
    struct signalfd_siginfo si;
    bool sigio = false;
    while (read(sfd, &si, sizeof si) == sizeof si) {
        switch (si.ssi_signo) {
        case SIGIO: sigio = true; break;
        case SIGTERM: case SIGINT: case SIGPWR:
            app_stop(SIGNAL_GRACE_MS, "init got a stop signal");
            break;
        default: break; /* SIGCHLD: reaped by app_tick */
        }
    }
    if (sigio) chan_check_host();
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Serves the host until the app exited and its output is delivered. */
static int serve(int sfd)
{
    int64_t next_recheck = now_ms() + RECHECK_MS;
    int64_t drain_deadline = 0;
    int status = 0;
    for (;;) {
        int64_t now = now_ms();
        app_tick(now);
        bool exited = app_exited(&status);
        if (exited && !drain_deadline) drain_deadline = now + OUTPUT_DRAIN_MS;
        appout_pump(now, exited);
        /* Done once the output is out, and no host is about to accept a
         * session (it ignores Exited before that); both bounded. */
        if (exited && ((appout_drained() && !chan_hello_pending()) || now >= drain_deadline))
            return status;
        if (now >= next_recheck) {
            chan_try_open();
            chan_check_host();
            next_recheck = now + RECHECK_MS;
        }
        if (!exited) ports_tick(now);

        int64_t wake = min64(next_recheck, min64(app_deadline(), appout_deadline(now)));
        if (!exited && chan_accepted()) wake = min64(wake, next_scan);
        if (exited) wake = min64(wake, drain_deadline);
        int timeout = (int)(wake > now ? wake - now : 0);

        struct pollfd pfd[5];
        int n = 0, chan_i = -1;
        if (sfd >= 0) pfd[n++] = (struct pollfd){ .fd = sfd, .events = POLLIN };
        if (chan_pollfd(&pfd[n])) chan_i = n++;
        n += appout_pollfds(&pfd[n], now);
        if (poll(pfd, n, timeout) < 0 && errno != EINTR) {
            logmsg("poll: %s", strerror(errno));
            sleep_ms(100);
            continue;
        }
        if (sfd >= 0 && (pfd[0].revents & POLLIN)) read_signals(sfd);
        if (chan_i >= 0) chan_on_poll(pfd[chan_i].revents);
        /* Pipe and console events need no handling here: the pump at the
         * top of the loop tries every stream. */
    }
}

int main(int argc, char **argv)
{
    if (getpid() != 1) {
        fprintf(stderr, "capsule-init: must run as PID 1\n");
        return 1;
    }
    umask(022);
    boot_mount_basics();
    logmsg("starting, build %s", CAPSULE_INIT_BUILD_ID);
    boot_load_modules();

    struct boot_args args;
    boot_read_cmdline(&args);
    LaunchConfig cfg = flexcap_guest_v1_LaunchConfig_init_zero;
    bool have_cfg = launch_config_read(&cfg);

    const char *host = (have_cfg && cfg.capsule_id && cfg.capsule_id[0]) ? cfg.capsule_id : "capsule";
    if (sethostname(host, strnlen(host, 64)) < 0) logmsg("sethostname: %s", strerror(errno));

    bool own_root = args.root[0] != 0;
    bool root_ok = !own_root || boot_mount_app_root(args.root);
    if (own_root && root_ok) {
        net_init(APP_ROOT_DIR "/run/resolv.conf"); /* the image's /etc/resolv.conf links there */
    } else {
        mkdir("/etc", 0755);
        net_init("/etc/resolv.conf");
    }
    if (args.ip[0]) {
        char err[256];
        int wait = virtio_device_present(VIRTIO_ID_NET) ? NET_WAIT_MS : 0;
        if (!net_apply(args.ip, args.gw, args.dns, wait, err, sizeof err))
            logmsg("network not configured: %s", err);
    } else {
        logmsg("no %s on the kernel command line; eth0 stays down", FLEXCAP_CMDLINE_IP);
    }

    int sfd = signals_init();
    chan_init(on_host_message);
    /* virtio-serial ports are announced asynchronously after the driver
     * loads; give the port a moment so early Exited frames are not lost. */
    int64_t port_deadline = now_ms() + (virtio_device_present(VIRTIO_ID_CONSOLE) ? PORT_WAIT_MS : 0);
    for (chan_try_open(); !chan_is_open() && now_ms() < port_deadline; chan_try_open())
        sleep_ms(20);
    if (!chan_is_open()) logmsg("no %s port; running without host channel", FLEXCAP_OS_PORT_NAME);

    if (!root_ok) {
        logmsg("app root not available; not starting the app");
        app_fail();
    } else if (!have_cfg) {
        app_fail();
    } else {
        app_start(&cfg, own_root ? APP_ROOT_DIR : NULL);
    }

    int status = serve(sfd);
    send_exited(status);
    power_off();
}
