/* The host channel: the virtio-serial port FLEXCAP_OS_PORT_NAME, framing,
 * the Hello/HelloReply session and a bounded, non-blocking transmit queue. */
#ifndef CAPSULE_INIT_CHAN_H
#define CAPSULE_INIT_CHAN_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "flexcap/guest/v1/guest.pb.h"

typedef flexcap_guest_v1_GuestMessage GuestMessage;
typedef flexcap_guest_v1_HostMessage HostMessage;

/* Host messages other than HelloReply go to this handler. */
void chan_init(void (*on_message)(const HostMessage *m));

/* Opens the port if it exists and is not open yet. */
void chan_try_open(void);
bool chan_is_open(void);
/* Re-reads whether the host end is connected; starts or drops the session. */
void chan_check_host(void);

/* Fills *p when the port should be polled (host end connected). */
bool chan_pollfd(struct pollfd *p);
/* Handles the revents of that pollfd. */
void chan_on_poll(short revents);

/* True once the host accepted this connection's Hello. */
bool chan_accepted(void);
/* True while a connected host has yet to answer our Hello. */
bool chan_hello_pending(void);
/* Counts accepted HelloReplies; a change means a new session that needs a
 * fresh snapshot of the guest's state. */
unsigned chan_session_count(void);

/* Queues a frame; false when there is no host or no room (the message is
 * then dropped). Exited may use the last bytes of the queue, other control
 * frames all but those, Log frames leave room for control frames. */
bool chan_send(const GuestMessage *m);

enum log_send { LOG_SENT, LOG_NO_SESSION, LOG_QUEUE_FULL };
/* Queues the app output chunk (len <= FLEXCAP_MAX_LOG_CHUNK) as a Log frame. */
enum log_send chan_send_log(int stream, const uint8_t *data, size_t len);

/* Waits (bounded) until the queue drained; false on timeout or disconnect. */
bool chan_drain(int timeout_ms);

#endif
