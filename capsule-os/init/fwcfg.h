/* The LaunchConfig, read from QEMU's fw_cfg file FLEXCAP_FWCFG_LAUNCH_NAME. */
#ifndef CAPSULE_INIT_FWCFG_H
#define CAPSULE_INIT_FWCFG_H

#include <stdbool.h>

#include "flexcap/guest/v1/guest.pb.h"

/* Decodes the LaunchConfig into cfg (malloc'd fields); false (logged) when
 * it is missing or malformed. */
bool launch_config_read(flexcap_guest_v1_LaunchConfig *cfg);

#endif
