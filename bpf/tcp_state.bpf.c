/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * TCP progress of traced sockets from sock:inet_sock_set_state, which fires only on TCP
 * state changes (never on other syscalls). CLOSE->SYN_SENT and CLOSE->LISTEN run in the
 * calling process; the outcome (SYN_SENT->ESTABLISHED or ->CLOSE) usually runs in softirq,
 * so the connecting process is remembered per socket.
 */

#include "events.h"
#include "inet.h"
#include "kernel_read.h"
#include "counters.h"
#include "scope.h"
#include "output.h"
#include "sock_stash.h"

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define TCP_LISTEN 10
#define O_NONBLOCK 04000

struct tcp_pending {
	struct record_header hdr;
	u64 cookie;
	u32 flags;
	u32 _pad0;
};

BPF_TABLE("lru_hash", u64, struct tcp_pending, tcp_pending, 16384);

/* A macro because BCC defines the tracepoint's argument struct only inside the probe. */
#define FILL_ADDRS(r, args)                                                 \
	do {                                                                \
		(r)->family = (args)->family;                               \
		(r)->sport = (args)->sport;                                 \
		(r)->dport = (args)->dport;                                 \
		(r)->oldstate = (args)->oldstate;                           \
		(r)->newstate = (args)->newstate;                           \
		if ((args)->family == AF_INET) {                            \
			__builtin_memcpy((r)->saddr, (args)->saddr, 4);     \
			__builtin_memcpy((r)->daddr, (args)->daddr, 4);     \
		} else {                                                    \
			__builtin_memcpy((r)->saddr, (args)->saddr_v6, 16); \
			__builtin_memcpy((r)->daddr, (args)->daddr_v6, 16); \
		}                                                           \
	} while (0)

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	u64 sk = (u64)args->skaddr;
	struct tcp_state_record r = {};
	struct tcp_pending *p;
	s32 sb;

	if (args->protocol != IPPROTO_TCP)
		return 0;

	if (args->newstate == TCP_SYN_SENT || args->newstate == TCP_LISTEN) {
		u32 tid;
		u64 *cookie, file;

		sb = lookup_sandbox();
		if (sb < 0)
			return 0;
		fill_header(&r.hdr, REC_TCP_STATE, sizeof(r), sb);
		FILL_ADDRS(&r, args);
		file = rd_u64(rd_u64(sk, OFF_SOCK_SK_SOCKET), OFF_SOCKET_FILE);
		if (file && (rd_u32(file, OFF_FILE_F_FLAGS) & O_NONBLOCK))
			r.flags |= SOCK_F_NONBLOCK;
		if (args->newstate == TCP_SYN_SENT) {
			struct tcp_pending pend = {};

			tid = r.hdr.tid;
			cookie = connect_stash.lookup(&tid);
			if (cookie) {
				r.cookie = *cookie;
				connect_stash.delete(&tid);
				/* A repeat the connect hook counted: nothing of it is sent. */
				if (r.cookie & COOKIE_REPEAT)
					return 0;
			} else {
				/* No cgroup hook saw this connect (the process left the traced
				 * cgroups): the socket's address keys its outcome instead. Socket
				 * cookies are small counters, kernel addresses are not. */
				r.cookie = sk;
			}
			pend.hdr = r.hdr;
			pend.cookie = r.cookie;
			pend.flags = r.flags;
			if (tcp_pending.update(&sk, &pend) != 0)
				count_error(ERR_STASH_MAP_FULL);
		}
		emit(args, &r, sizeof(r), REC_TCP_STATE);
		return 0;
	}

	if (args->oldstate == TCP_SYN_SENT) {
		p = tcp_pending.lookup(&sk);
		if (!p)
			return 0;
		r.hdr = p->hdr;
		r.hdr.ktime_ns = bpf_ktime_get_ns();
		r.cookie = p->cookie;
		r.flags = p->flags;
		FILL_ADDRS(&r, args);
		if (args->newstate == TCP_CLOSE)
			r.err = rd_u32(sk, OFF_SOCK_SK_ERR);
		tcp_pending.delete(&sk);
		emit(args, &r, sizeof(r), REC_TCP_STATE);
		return 0;
	}
	if (args->newstate == TCP_CLOSE)
		tcp_pending.delete(&sk);
	return 0;
}
