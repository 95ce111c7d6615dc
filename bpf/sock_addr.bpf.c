/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * connect and bind, from cgroup socket-address hooks attached to the traced cgroups only:
 * processes elsewhere on the host never run these programs. A hook sees the call before the
 * protocol acts on it, so outcomes come from elsewhere: post_bind for binds, and the TCP
 * state tracepoint (tcp_state.bpf.c) for connects. Under enforcement (enforce.h) a connect
 * outside the sandbox's policy is refused here, with EPERM, and its record says so.
 */

#include "events.h"
#include "inet.h"
#include "counters.h"
#include "scope.h"
#include "output.h"
#include "sock_stash.h"
#include "enforce.h"

/* Read by user space (probes/loader.py), which reports counts left when a window ends. */
BPF_TABLE("lru_hash", struct dest_key, struct dest_seen, dest_seen, DEST_SEEN_MAX);
BPF_PERCPU_ARRAY(dest_scratch, struct dest_seen, 1);

/* Whether this connect repeats REPEAT_BUDGET others to its destination sent less than
 * REPEAT_WINDOW_NS ago: then it is counted and not sent. A connect after the window starts
 * a new one and carries the previous window's count, so that a flood of connects to one
 * destination is at most REPEAT_BUDGET records a window, whatever its rate. */
static __always_inline bool counted_repeat(struct connect_record *r, bool *first)
{
	struct dest_key key = {};
	struct dest_seen *seen, *fresh;
	u32 zero = 0;

	if (!REPEAT_WINDOW_NS)
		return false;

	key.start_ns = r->hdr.start_ns;
	key.tgid = r->hdr.pid;
	key.family = r->family;
	key.dport = r->dport;
	/* denied and allowed connects to one destination are counted apart */
	key.sock_type = r->sock_type | (r->flags & SOCK_F_DENIED ? DEST_DENIED : 0);
	key.protocol = r->protocol;
	__builtin_memcpy(key.daddr, r->daddr, sizeof(key.daddr));
	seen = dest_seen.lookup(&key);
	*first = !seen;
	if (seen) {
		if (r->hdr.ktime_ns - seen->window_ns < REPEAT_WINDOW_NS) {
			if (seen->sent < REPEAT_BUDGET) {
				__sync_fetch_and_add(&seen->sent, 1);
				return false;
			}
			__sync_fetch_and_add(&seen->count, 1);
			return true;
		}
		r->repeats = seen->count;
	}
	fresh = dest_scratch.lookup(&zero);
	if (!fresh)
		return false;
	fresh->window_ns = r->hdr.ktime_ns;
	fresh->sent = 1;
	fresh->count = 0;
	fresh->rec = *r;
	fresh->rec.repeats = 0;
	if (dest_seen.update(&key, fresh) != 0)
		count_error(ERR_STASH_MAP_FULL);
	return false;
}

static __always_inline int on_connect(struct bpf_sock_addr *ctx, u16 family)
{
	struct connect_record r = {};
	struct bpf_sock *sk;
	u32 tid;
	u64 cookie;
	bool repeat, first = false;
	s32 sb = lookup_sandbox();
	int denied = -1;

	if (sb < 0)
		return 1;
	fill_header(&r.hdr, REC_CONNECT, sizeof(r), sb);
	r.cookie = bpf_get_socket_cookie(ctx);
	r.family = family;
	r.dport = bpf_ntohs(ctx->user_port);
	r.sock_type = ctx->type;
	r.protocol = ctx->protocol;
	if (family == AF_INET)
		copy_ip4(r.daddr, ctx->user_ip4);
	else
		copy_ip6(r.daddr, ctx->user_ip6);
	sk = ctx->sk;
	if (sk) {
		r.sport = sk->src_port;
		if (family == AF_INET)
			copy_ip4(r.saddr, sk->src_ip4);
		else
			copy_ip6(r.saddr, sk->src_ip6);
		r.flags |= SOCK_F_LOCAL_KNOWN;
	}
#ifdef HAVE_ENFORCE
	denied = enf_verdict(sb, family, r.daddr, r.dport, false);
	if (denied >= 0) {
		r.flags |= SOCK_F_DENIED;
		enf_count(denied);
	}
#endif
	repeat = counted_repeat(&r, &first);
	if (r.sock_type == SOCK_STREAM && r.protocol == IPPROTO_TCP && denied < 0) {
		tid = r.hdr.tid;
		cookie = repeat ? r.cookie | COOKIE_REPEAT : r.cookie;
		if (connect_stash.update(&tid, &cookie) != 0)
			count_error(ERR_STASH_MAP_FULL);
	}
	if (first)
		emit_priority(ctx, &r, sizeof(r), REC_CONNECT);
	else if (!repeat)
		emit(ctx, &r, sizeof(r), REC_CONNECT);
	return denied < 0 ? 1 : 0; /* 0: the connect fails with EPERM */
}

int connect4(struct bpf_sock_addr *ctx)
{
	return on_connect(ctx, AF_INET);
}

int connect6(struct bpf_sock_addr *ctx)
{
	return on_connect(ctx, AF_INET6);
}

static __always_inline int on_bind(struct bpf_sock_addr *ctx, u16 family)
{
	struct bind_record r = {};
	struct bind_record *stale;
	s32 sb = lookup_sandbox();
	u32 tid;

	if (sb < 0)
		return 1;
	tid = (u32)bpf_get_current_pid_tgid();
	/* A bind this thread started earlier that post_bind never saw: it failed. */
	stale = bind_stash.lookup(&tid);
	if (stale)
		emit_failed_bind(ctx, stale);
	fill_header(&r.hdr, REC_BIND, sizeof(r), sb);
	r.cookie = bpf_get_socket_cookie(ctx);
	r.family = family;
	r.req_port = bpf_ntohs(ctx->user_port);
	r.sock_type = ctx->type;
	r.protocol = ctx->protocol;
	r.flags = BIND_F_REQUEST_KNOWN;
	if (family == AF_INET)
		copy_ip4(r.req_addr, ctx->user_ip4);
	else
		copy_ip6(r.req_addr, ctx->user_ip6);
	if (bind_stash.update(&tid, &r) != 0)
		count_error(ERR_STASH_MAP_FULL);
	return 1;
}

int bind4(struct bpf_sock_addr *ctx)
{
	return on_bind(ctx, AF_INET);
}

int bind6(struct bpf_sock_addr *ctx)
{
	return on_bind(ctx, AF_INET6);
}

static __always_inline int on_post_bind(struct bpf_sock *sk, u16 family)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct bind_record *req = bind_stash.lookup(&tid);
	struct bind_record r = {};
	s32 sb;

	if (req) {
		r = *req;
		bind_stash.delete(&tid);
		r.hdr.ktime_ns = bpf_ktime_get_ns();
	} else {
		sb = lookup_sandbox();
		if (sb < 0)
			return 1;
		fill_header(&r.hdr, REC_BIND, sizeof(r), sb);
		r.family = family;
		r.sock_type = sk->type;
		r.protocol = sk->protocol;
	}
	r.port = sk->src_port;
	if (family == AF_INET)
		copy_ip4(r.addr, sk->src_ip4);
	else
		copy_ip6(r.addr, sk->src_ip6);
	emit(sk, &r, sizeof(r), REC_BIND);
	return 1;
}

int post_bind4(struct bpf_sock *sk)
{
	return on_post_bind(sk, AF_INET);
}

int post_bind6(struct bpf_sock *sk)
{
	return on_post_bind(sk, AF_INET6);
}
