/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Raw IP sockets made in a sandbox, from the cgroup sock_create hook on the traced cgroups:
 * a raw socket crafts packets no connect or bind shows (scans, ICMP tunnels, spoofing). The
 * hook runs for every inet socket the sandbox makes; only raw ones become records. It never
 * sees other families (AF_PACKET among them): probes/kernel.py says so at startup.
 */

#include "events.h"
#include "counters.h"
#include "scope.h"
#include "output.h"
#include "inet.h"
#include "sock_stash.h"

#ifdef HAVE_SOCK_CREATE

#ifndef SOCK_RAW
#define SOCK_RAW 3
#endif

int sock_create(struct bpf_sock *sk)
{
	struct sock_create_record r = {};
	u64 cookie;
	s32 sb;

#ifdef HAVE_FLOWS
	if (sk->type != SOCK_RAW && sk->type != SOCK_DGRAM && sk->type != SOCK_STREAM)
		return 1;
#else
	if (sk->type != SOCK_RAW && sk->type != SOCK_DGRAM)
		return 1;
#endif
	sb = lookup_sandbox();
	if (sb < 0)
		return 1;
	fill_header(&r.hdr, REC_SOCK_CREATE, sizeof(r), sb);
#ifdef HAVE_UDP_EGRESS
	/* The process a socket's packets belong to: a datagram socket's sends without connect()
	 * (skb_egress), and, where flows are classified, any socket's first bytes each way. */
	if (sk->type != SOCK_RAW) {
		struct sock_owner owner = { .hdr = r.hdr };

		cookie = bpf_get_socket_cookie(sk);
		if (sock_owner.update(&cookie, &owner) != 0)
			count_error(ERR_STASH_MAP_FULL);
		return 1;
	}
#endif
	if (sk->type != SOCK_RAW)
		return 1;
	r.cookie = bpf_get_socket_cookie(sk);
	r.family = sk->family;
	r.sock_type = sk->type;
	r.protocol = sk->protocol;
	emit_priority(sk, &r, sizeof(r), REC_SOCK_CREATE);
	return 1;
}

#endif /* HAVE_SOCK_CREATE */
