/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Packets a sandbox sends, from a cgroup_skb egress program on the traced cgroups only:
 * cgroups without a program skip the hook almost for free. It classifies each socket's first
 * bytes out (flows.h), and reports datagrams sent without connect() (sendto/sendmsg naming a destination): unlike
 * cgroup/sendmsg4/6, which every unconnected UDP send on the host would run. A packet carries no process context, so the process that made the socket is kept by
 * socket cookie when the socket is made (sock_create.bpf.c); the first datagram of a socket
 * to a destination is sent as a connect record (SOCK_F_UNCONNECTED), the ones after it
 * counted as repeats, like connects (sock_addr.bpf.c).
 */

#include "events.h"
#include "inet.h"
#include "counters.h"
#include "output.h"
#include "sock_stash.h"
#include "flows.h"

#ifdef HAVE_UDP_EGRESS

#ifndef ETH_P_IP
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#endif
#ifndef IPPROTO_UDP
#define IPPROTO_UDP 17
#endif

BPF_TABLE("lru_hash", struct dest_key, struct dest_seen, udp_seen, DEST_SEEN_MAX);
BPF_PERCPU_ARRAY(udp_scratch, struct dest_seen, 1);

/* Where an outgoing UDP datagram goes: its address and port from the IP and UDP headers
 * (the packet starts at the network header here); false for anything else. */
static __always_inline bool udp_destination(struct __sk_buff *skb, struct dest_key *key)
{
	u8 first = 0, next = 0;
	u16 port = 0;
	u32 l4;

	if (bpf_skb_load_bytes(skb, 0, &first, 1))
		return false;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 9, &next, 1) || next != IPPROTO_UDP)
			return false;
		l4 = (first & 0x0f) * 4;
		if (bpf_skb_load_bytes(skb, 16, key->daddr, 4))
			return false;
		key->family = AF_INET;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		/* extension headers before UDP are not followed: such datagrams are not seen */
		if (bpf_skb_load_bytes(skb, 6, &next, 1) || next != IPPROTO_UDP)
			return false;
		l4 = 40;
		if (bpf_skb_load_bytes(skb, 24, key->daddr, 16))
			return false;
		key->family = AF_INET6;
	} else {
		return false;
	}
	if (bpf_skb_load_bytes(skb, l4 + 2, &port, 2))
		return false;
	key->dport = bpf_ntohs(port);
	return true;
}

int skb_egress(struct __sk_buff *skb)
{
	struct dest_key key = {};
	struct dest_seen *seen, *fresh;
	struct bpf_sock *sk = skb->sk;
	struct sock_owner *owner;
	u64 cookie, now;
	u32 zero = 0;

	if (!sk)
		return 1;
#ifdef HAVE_FLOWS
	flow_packet(skb, false);
#endif
	sk = bpf_sk_fullsock(sk);
	/* a connected socket's datagrams were reported at connect() */
	if (!sk || sk->type != SOCK_DGRAM || sk->dst_port)
		return 1;
	cookie = bpf_get_socket_cookie(skb);
	owner = sock_owner.lookup(&cookie);
	if (!owner)
		return 1;
	if (!udp_destination(skb, &key))
		return 1;
	key.start_ns = cookie; /* per socket, not per process */
	key.tgid = owner->hdr.pid;
	key.sock_type = SOCK_DGRAM;
	key.protocol = IPPROTO_UDP;
	now = bpf_ktime_get_ns();
	seen = udp_seen.lookup(&key);
	if (seen && now - seen->window_ns < REPEAT_WINDOW_NS) {
		__sync_fetch_and_add(&seen->count, 1);
		return 1;
	}
	fresh = udp_scratch.lookup(&zero);
	if (!fresh)
		return 1;
	__builtin_memset(&fresh->rec, 0, sizeof(fresh->rec));
	fresh->rec.hdr = owner->hdr;
	fresh->rec.hdr.type = REC_CONNECT;
	fresh->rec.hdr.size = sizeof(fresh->rec);
	fresh->rec.hdr.ktime_ns = now;
	fresh->rec.cookie = cookie;
	fresh->rec.family = key.family;
	fresh->rec.dport = key.dport;
	fresh->rec.sock_type = SOCK_DGRAM;
	fresh->rec.protocol = IPPROTO_UDP;
	fresh->rec.flags = SOCK_F_UNCONNECTED;
	__builtin_memcpy(fresh->rec.daddr, key.daddr, sizeof(key.daddr));
	fresh->rec.repeats = seen ? seen->count : 0;
	if (seen)
		emit(skb, &fresh->rec, sizeof(fresh->rec), REC_CONNECT);
	else
		emit_priority(skb, &fresh->rec, sizeof(fresh->rec), REC_CONNECT);
	fresh->window_ns = now;
	fresh->sent = 1;
	fresh->count = 0;
	fresh->rec.repeats = 0;
	if (udp_seen.update(&key, fresh) != 0)
		count_error(ERR_STASH_MAP_FULL);
	return 1;
}

#endif /* HAVE_UDP_EGRESS */
