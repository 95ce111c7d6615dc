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
#include "enforce.h"

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

#ifdef HAVE_ENFORCE
/* The verdict on a UDP datagram of a sandbox socket (enforce.h): -1 when allowed, else the
 * enf_kind of the denial. A connected socket's datagrams to its peer were judged at
 * connect(); one sent elsewhere (sendto naming another destination) is judged here. */
static __always_inline int enf_datagram(struct __sk_buff *skb, struct bpf_sock *sk,
					struct dest_key *key)
{
	s32 sb;

	if (!udp_destination(skb, key))
		return -1;
	if (sk->dst_port && bpf_ntohs(sk->dst_port) == key->dport) {
		if (key->family == AF_INET && sk->family == AF_INET) {
			u32 a = 0;

			__builtin_memcpy(&a, key->daddr, 4);
			if (a == sk->dst_ip4)
				return -1;
		} else if (key->family == AF_INET6 && sk->family == AF_INET6) {
			u32 a[4] = {};

			__builtin_memcpy(a, key->daddr, 16);
			if (a[0] == sk->dst_ip6[0] && a[1] == sk->dst_ip6[1] &&
			    a[2] == sk->dst_ip6[2] && a[3] == sk->dst_ip6[3])
				return -1;
		}
	}
	sb = enf_sandbox_of_skb(skb);
	if (sb < 0)
		return -1;
	return enf_verdict(sb, key->family, key->daddr, key->dport, true);
}
#endif

int skb_egress(struct __sk_buff *skb)
{
	struct dest_key key = {};
	struct dest_seen *seen, *fresh;
	struct bpf_sock *sk = skb->sk, *full;
	struct sock_owner *owner;
	u64 cookie, now;
	u32 zero = 0, flags = SOCK_F_UNCONNECTED;
	int denied = -1;

	if (!sk)
		return 1;
#ifdef HAVE_FLOWS
	flow_packet(skb, false);
#endif
	full = bpf_sk_fullsock(sk);
#ifdef HAVE_ENFORCE
	/* a datagram outside the policy is dropped: the send fails with EPERM */
	if (full && full->type == SOCK_DGRAM) {
		denied = enf_datagram(skb, full, &key);
		if (denied >= 0) {
			enf_count(denied);
			flags |= SOCK_F_DENIED;
		}
	}
#endif
	sk = full;
	if (!sk)
		return 1;
	/* a connected socket's datagrams were reported at connect() */
	if (sk->type != SOCK_DGRAM || (sk->dst_port && denied < 0))
		return 1;
	cookie = bpf_get_socket_cookie(skb);
	owner = sock_owner.lookup(&cookie);
	if (!owner)
		return denied < 0 ? 1 : 0;
	if (denied < 0 && !udp_destination(skb, &key))
		return 1;
	key.start_ns = cookie; /* per socket, not per process */
	key.tgid = owner->hdr.pid;
	key.sock_type = SOCK_DGRAM | (denied < 0 ? 0 : DEST_DENIED);
	key.protocol = IPPROTO_UDP;
	now = bpf_ktime_get_ns();
	seen = udp_seen.lookup(&key);
	if (seen && now - seen->window_ns < REPEAT_WINDOW_NS) {
		__sync_fetch_and_add(&seen->count, 1);
		return denied < 0 ? 1 : 0;
	}
	fresh = udp_scratch.lookup(&zero);
	if (!fresh)
		return denied < 0 ? 1 : 0;
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
	fresh->rec.flags = flags;
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
	return denied < 0 ? 1 : 0;
}

#endif /* HAVE_UDP_EGRESS */
