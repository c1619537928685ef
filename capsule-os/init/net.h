/* eth0's static IPv4 identity and the resolver file. */
#ifndef CAPSULE_INIT_NET_H
#define CAPSULE_INIT_NET_H

#include <stdbool.h>
#include <stddef.h>

/* Brings lo up and remembers where the resolver goes (/etc/resolv.conf, or
 * <app root>/run/resolv.conf when the app has its own read-only root). */
void net_init(const char *resolv_path);

/* Validates everything first, then gives eth0 `cidr` ("a.b.c.d/len"),
 * replaces the default route (none when gw is "") and rewrites the resolver
 * (empty when dns is ""). Waits up to wait_ms for eth0 to appear. On failure
 * returns false with a one-line reason in err; invalid input changes nothing. */
bool net_apply(const char *cidr, const char *gw, const char *dns, int wait_ms,
               char *err, size_t errlen);

#endif
