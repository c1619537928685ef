/* Which ports guest sockets listen on, from /proc/net/{tcp,udp}{,6}. */
#ifndef CAPSULE_INIT_LISTEN_H
#define CAPSULE_INIT_LISTEN_H

#include <stdbool.h>
#include <stdint.h>

#include "flexcap_wire.h"

struct listen_set {
    unsigned n;
    struct { uint8_t proto; uint16_t port; } e[FLEXCAP_MAX_LISTEN_PORTS]; /* proto: Protocol enum */
};

/* The ports reachable from outside: TCP in LISTEN, unconnected bound UDP;
 * sockets bound only to loopback are left out. Sorted by (protocol, port),
 * without duplicates; the smallest FLEXCAP_MAX_LISTEN_PORTS when there are
 * more. Missing or odd /proc files just contribute nothing. */
void listen_scan(struct listen_set *out);

bool listen_equal(const struct listen_set *a, const struct listen_set *b);

#endif
