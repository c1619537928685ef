/* The app's stdout and stderr: pipes read by PID 1 and forwarded as Log
 * frames while a host session is up, else to the console. */
#ifndef CAPSULE_INIT_APPOUT_H
#define CAPSULE_INIT_APPOUT_H

#include <poll.h>
#include <stdbool.h>
#include <stdint.h>

/* Takes the non-blocking read ends of the app's stdout and stderr pipes. */
void appout_init(int out_fd, int err_fd);

/* Adds what the output needs polled (at most 2 entries); returns how many. */
int appout_pollfds(struct pollfd *p, int64_t now);
/* Earliest time the output needs a wakeup without an fd event, or INT64_MAX. */
int64_t appout_deadline(int64_t now);

/* Moves output on: reads the pipes and delivers what it can without
 * blocking. `draining` (the app exited): no batching delay, and a full
 * queue diverts to the console at once. */
void appout_pump(int64_t now, bool draining);

/* After the app exited: everything it wrote has been delivered. */
bool appout_drained(void);

#endif
