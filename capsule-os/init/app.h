/* The app process: start (root, workdir, output pipes), stop, reap. */
#ifndef CAPSULE_INIT_APP_H
#define CAPSULE_INIT_APP_H

#include <stdbool.h>
#include <stdint.h>

#include "flexcap/guest/v1/guest.pb.h"

/* Forks the app described by cfg, chrooted to `root` unless NULL, in
 * cfg->workdir ("/" when empty), stdout/stderr into appout. When it cannot
 * start, the app counts as exited with code 127. */
void app_start(const flexcap_guest_v1_LaunchConfig *cfg, const char *root);

/* Marks the app as never started: exit code 127. */
void app_fail(void);

/* SIGTERM now, SIGKILL after grace_ms (a later, shorter grace wins). */
void app_stop(uint32_t grace_ms, const char *why);

/* Reaps every exited child (PID 1 adopts orphans); sends a due SIGKILL. */
void app_tick(int64_t now);

/* When app_tick next needs to run, or INT64_MAX. */
int64_t app_deadline(void);

/* True once the app exited; *status is its wait status. */
bool app_exited(int *status);

#endif
