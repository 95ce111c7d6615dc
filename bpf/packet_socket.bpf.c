/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * AF_PACKET sockets made in a sandbox, from a kprobe on packet_create (af_packet's socket()
 * handler): a packet socket reads and writes whole link-layer frames (sniffing, ARP
 * spoofing, crafted packets) that no connect, bind or cgroup hook sees, and the cgroup
 * sock_create hook runs for inet sockets only. The kprobe fires only when a packet socket is
 * made anywhere on the host (rare: DHCP clients, tcpdump), and the scope decision drops other
 * processes' in the kernel. The record is the raw socket's, family AF_PACKET; its protocol
 * is the ethertype given to socket(), in host order. Traffic on the socket stays unseen
 * (probes/kernel.py says so at startup).
 */

#include "events.h"
#include "counters.h"
#include "scope.h"
#include "output.h"
#include "kernel_read.h"

#ifdef HAVE_PACKET_KPROBE

#if !defined(OFF_PT_REGS_ARG2) || !defined(OFF_PT_REGS_ARG3) || !defined(OFF_PT_REGS_ARG4)
#error "kprobe argument offsets missing: build through probes/loader.py, which reads them from BTF"
#endif

#ifndef AF_PACKET
#define AF_PACKET 17
#endif

struct pt_regs;

/* A function's argument from the registers a kprobe gets (offsets from BTF, per machine). */
#define KPROBE_ARG(ctx, n) (*(u64 *)((char *)(ctx) + OFF_PT_REGS_ARG##n))

/* int packet_create(struct net *net, struct socket *sock, int protocol, int kern) */
int kprobe__packet_create(struct pt_regs *ctx)
{
	struct sock_create_record r = {};
	u64 sock = KPROBE_ARG(ctx, 2);
	u32 protocol = (u32)KPROBE_ARG(ctx, 3);
	s32 sb;

	if ((u32)KPROBE_ARG(ctx, 4)) /* a socket the kernel makes for itself */
		return 0;
	sb = lookup_sandbox();
	if (sb < 0)
		return 0;
	fill_header(&r.hdr, REC_SOCK_CREATE, sizeof(r), sb);
	r.family = AF_PACKET;
	r.sock_type = rd_u16(sock, OFF_SOCKET_TYPE);
	r.protocol = bpf_ntohs((u16)protocol); /* socket()'s protocol: a big-endian ethertype */
	emit_priority(ctx, &r, sizeof(r), REC_SOCK_CREATE);
	return 0;
}

#endif /* HAVE_PACKET_KPROBE */
