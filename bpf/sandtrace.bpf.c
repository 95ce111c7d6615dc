/* SPDX-License-Identifier: GPL-2.0-only */
/* The one compilation unit BCC builds: shared maps first, then each hook's programs. */

#include "maps.h"

#include "sock_addr.bpf.c"
#include "process.bpf.c"
#include "tcp_state.bpf.c"
