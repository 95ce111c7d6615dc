/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * connect() on AF_UNIX sockets, from the cgroup unix connect hook (Linux 6.7+) attached to
 * the traced cgroups: a sandbox reaching a container runtime's or an orchestrator's socket
 * (docker.sock, containerd.sock, the kubelet) is a connect too. Built only where the kernel
 * has the hook (probes/kernel.py says at startup when it does not). Under enforcement, a
 * connect to a socket whose file name is a container runtime's (enf_unix) is refused.
 */

#include "events.h"
#include "kernel_read.h"
#include "counters.h"
#include "scope.h"
#include "output.h"
#include "enforce.h"

#ifdef HAVE_UNIX_CONNECT

#if !defined(OFF_SOCK_ADDR_KERN_UADDR) || !defined(OFF_SOCK_ADDR_KERN_UADDRLEN)
#error "bpf_sock_addr_kern offsets missing: build through probes/loader.py"
#endif

#define SUN_FAMILY_SIZE 2

int connect_unix(struct bpf_sock_addr *ctx)
{
	struct unix_connect_record r = {};
	/* A unix address is no context field: the context is the kernel's struct
	 * bpf_sock_addr_kern, whose address and length are read at their BTF offsets. The
	 * address is the kernel's copy of what the caller gave, at least UNIX_PATH_MAX long. */
	u64 kctx = (u64)ctx;
	u64 uaddr;
	u32 len;
	s32 sb = lookup_sandbox();

	if (sb < 0)
		return 1;
	uaddr = rd_u64(kctx, OFF_SOCK_ADDR_KERN_UADDR);
	len = rd_u32(kctx, OFF_SOCK_ADDR_KERN_UADDRLEN);
	fill_header(&r.hdr, REC_UNIX_CONNECT, sizeof(r), sb);
	r.cookie = bpf_get_socket_cookie(ctx);
	r.sock_type = ctx->type;
	len = len > SUN_FAMILY_SIZE ? len - SUN_FAMILY_SIZE : 0;
	r.path_size = len < UNIX_PATH_MAX ? len : UNIX_PATH_MAX;
	if (uaddr && r.path_size)
		bpf_probe_read_kernel(r.path, sizeof(r.path), (void *)(uaddr + SUN_FAMILY_SIZE));
#ifdef HAVE_ENFORCE
	if (enf_unix_denied(sb, r.path, r.path_size)) {
		r.flags |= UNIX_F_DENIED;
		enf_count(ENF_DENIED_UNIX);
		emit_priority(ctx, &r, sizeof(r), REC_UNIX_CONNECT);
		return 0; /* EPERM */
	}
#endif
	emit_priority(ctx, &r, sizeof(r), REC_UNIX_CONNECT);
	return 1;
}

#endif /* HAVE_UNIX_CONNECT */
