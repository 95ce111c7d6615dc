/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The one compilation unit BCC builds (probes/loader.py inlines local includes, each file
 * once): every hook's program file. Each program file includes the headers it uses, so they
 * may come in any order, and each compiles on its own too.
 */

#include "process.bpf.c"
#include "sock_addr.bpf.c"
#include "tcp_state.bpf.c"
#include "unix_connect.bpf.c"
#include "sock_create.bpf.c"
#include "io_uring.bpf.c"
#include "packet_socket.bpf.c"
#include "skb_egress.bpf.c"
#include "skb_ingress.bpf.c"
