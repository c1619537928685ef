#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "app.h"
#include "appout.h"
#include "util.h"

#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static pid_t app_pid = -1;
static bool done;
static int status;
static bool term_sent;
static int64_t kill_deadline; /* 0 = none */

void app_fail(void)
{
    done = true;
    status = 127 << 8;
}

/* Runs in the forked child. Every failure ends in _exit(127): the host sees
 * it as the app's exit code, the console says why. */
static void __attribute__((noreturn)) child(char **argv, char **envp, const char *root,
                                            const char *workdir, int out_w, int err_w)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL); /* PID 1 blocks its signals for signalfd */
    setsid();
    /* Failures go to the console (PID 1's stderr), not into the app's log. */
    int console = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
    if (console >= 0) log_fd = console;
    int in = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (root && chroot(root) < 0) {
        logmsg("chroot %s: %s", root, strerror(errno));
        _exit(127);
    }
    /* chroot leaves the cwd outside the new root; "/" first also makes a
     * relative workdir start from the root. */
    if (chdir("/") < 0 || chdir(workdir) < 0) {
        logmsg("workdir %s: %s; not starting %s", workdir, strerror(errno), argv[0]);
        _exit(127);
    }
    if ((in >= 0 && dup2(in, 0) < 0) || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0) {
        logmsg("stdio: %s", strerror(errno));
        _exit(127);
    }
    execve(argv[0], argv, envp);
    logmsg("exec %s: %s", argv[0], strerror(errno));
    _exit(127);
}

void app_start(const flexcap_guest_v1_LaunchConfig *cfg, const char *root)
{
    if (cfg->argv_count == 0 || !cfg->argv[0] || !cfg->argv[0][0]) {
        logmsg("LaunchConfig has no argv");
        return app_fail();
    }
    const char *workdir = cfg->workdir && cfg->workdir[0] ? cfg->workdir : "/";
    char **argv = calloc(cfg->argv_count + 1, sizeof *argv);
    char **envp = calloc(cfg->env_count + 2, sizeof *envp);
    int out[2] = { -1, -1 }, err[2] = { -1, -1 };
    if (!argv || !envp || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
        logmsg("cannot start the app: %s", strerror(errno));
        app_fail();
        goto out;
    }
    for (pb_size_t i = 0; i < cfg->argv_count; i++) argv[i] = cfg->argv[i] ? cfg->argv[i] : "";
    bool has_path = false;
    pb_size_t ne = 0;
    for (pb_size_t i = 0; i < cfg->env_count; i++) {
        if (!cfg->env[i]) continue;
        if (strncmp(cfg->env[i], "PATH=", 5) == 0) has_path = true;
        envp[ne++] = cfg->env[i];
    }
    if (!has_path) envp[ne++] = DEFAULT_PATH;

    app_pid = fork();
    if (app_pid == 0) child(argv, envp, root, workdir, out[1], err[1]);
    if (app_pid < 0) {
        logmsg("fork: %s", strerror(errno));
        app_fail();
        goto out;
    }
    logmsg("started %s (pid %d) in %s%s", argv[0], (int)app_pid, root ? root : "", workdir);
    /* Only PID 1's ends are non-blocking; the app keeps normal pipes. */
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(err[0], F_SETFL, O_NONBLOCK);
    appout_init(out[0], err[0]);
    out[0] = err[0] = -1;
out:
    for (int i = 0; i < 2; i++) {
        if (out[i] >= 0) close(out[i]);
        if (err[i] >= 0) close(err[i]);
    }
    free(argv);
    free(envp);
}

void app_stop(uint32_t grace_ms, const char *why)
{
    if (app_pid <= 0 || done) return;
    int64_t deadline = now_ms() + grace_ms;
    if (!term_sent) {
        logmsg("%s: SIGTERM to app (pid %d), SIGKILL in %u ms", why, (int)app_pid, grace_ms);
        kill(app_pid, SIGTERM);
        term_sent = true;
        kill_deadline = deadline;
    } else if (deadline < kill_deadline) {
        kill_deadline = deadline;
    }
}

void app_tick(int64_t now)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        if (pid == app_pid) {
            done = true;
            status = st;
            kill_deadline = 0;
        }
    }
    if (kill_deadline && now >= kill_deadline && !done) {
        logmsg("grace period over: SIGKILL to app (pid %d)", (int)app_pid);
        kill(app_pid, SIGKILL);
        kill_deadline = 0;
    }
}

int64_t app_deadline(void)
{
    return kill_deadline ? kill_deadline : INT64_MAX;
}

bool app_exited(int *st)
{
    if (done) *st = status;
    return done;
}
