/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What a thread's socket call left for a later hook to complete, keyed by thread id: the
 * cookie of a TCP connect until the socket reaches SYN_SENT (tcp_state.bpf.c), and a bind
 * until post_bind sees it done (sock_addr.bpf.c). An entry a thread leaves behind when it
 * exits is cleared then (process.bpf.c), a stashed bind reported as failed.
 */
#ifndef SANDTRACE_SOCK_STASH_H
#define SANDTRACE_SOCK_STASH_H

#include "events.h"
#include "output.h"

#define SOCK_STASH_MAX 16384

/* Set in the stashed cookie of a TCP connect the connect hook counted as a repeat: its TCP
 * progress is not reported either. Socket cookies are counters far below this bit. */
#define COOKIE_REPEAT (1ULL << 63)

#ifndef REPEAT_WINDOW_NS
#define REPEAT_WINDOW_NS 1000000000ULL
#endif
/* Connects to one destination sent each window before the rest are counted: a process that
 * talks to a server now and then loses nothing to the counting. */
#ifndef REPEAT_BUDGET
#define REPEAT_BUDGET 1024
#endif
#define DEST_SEEN_MAX 16384
/* In dest_key.sock_type: the connects counted were refused (enforce.h). */
#define DEST_DENIED (1U << 31)

/* A process's destination: who (pid and start time, for pid reuse) connected where. */
struct dest_key {
	u64 start_ns;
	u32 tgid;
	u16 family;
	u16 dport;
	u32 sock_type;
	u32 protocol;
	u8 daddr[16];
};

/* The first connect of a window to one destination, those sent, and those counted. */
struct dest_seen {
	u64 window_ns;
	u64 sent;
	u64 count;
	struct connect_record rec;
};

/* Who made a socket in a sandbox (datagram sockets; stream ones too where flows are
 * classified), by socket cookie, for the cgroup_skb programs, which see packets without
 * process context (skb_egress.bpf.c, skb_ingress.bpf.c; filled by sock_create.bpf.c); and
 * which directions of its flow were classified already (flows.h). */
struct sock_owner {
	struct record_header hdr;
	u32 flow_done; /* FLOW_DONE_* */
	u32 _pad0;
};

#define FLOW_DONE_OUT (1U << 0)
#define FLOW_DONE_IN (1U << 1)

BPF_TABLE("lru_hash", u64, struct sock_owner, sock_owner, SOCK_STASH_MAX);

/* Thread -> cookie of the TCP connect it is making, until the socket reaches SYN_SENT. */
BPF_TABLE("lru_hash", u32, u64, connect_stash, SOCK_STASH_MAX);
/* Thread -> the bind it is making, until post_bind completes it. */
BPF_TABLE("lru_hash", u32, struct bind_record, bind_stash, SOCK_STASH_MAX);

/* A stashed bind that post_bind never saw: the bind failed. */
static __always_inline void emit_failed_bind(void *ctx, struct bind_record *stale)
{
	stale->flags |= BIND_F_FAILED;
	emit(ctx, stale, sizeof(*stale), REC_BIND);
}

/* Clear what an exiting thread left in the stashes. */
static __always_inline void forget_thread(void *ctx, u32 tid)
{
	struct bind_record *stale = bind_stash.lookup(&tid);

	if (stale) {
		emit_failed_bind(ctx, stale);
		bind_stash.delete(&tid);
	}
	connect_stash.delete(&tid);
}

#endif /* SANDTRACE_SOCK_STASH_H */
