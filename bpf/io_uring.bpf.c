/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * io_uring instances set up by traced processes. Work submitted through a ring makes no
 * syscalls of its own (its connects still reach the cgroup hooks); a ring in a sandbox is
 * worth knowing about. The tracepoint fires only on io_uring_setup, host-wide, and the
 * scope decision drops other processes' in the kernel.
 */

#include "events.h"
#include "counters.h"
#include "scope.h"
#include "output.h"

#ifdef HAVE_IO_URING_TP

TRACEPOINT_PROBE(io_uring, io_uring_create)
{
	struct io_uring_record r = {};
	s32 sb = lookup_sandbox();

	if (sb < 0)
		return 0;
	fill_header(&r.hdr, REC_IO_URING, sizeof(r), sb);
	r.fd = args->fd;
	r.sq_entries = args->sq_entries;
	r.cq_entries = args->cq_entries;
	r.flags = args->flags;
	emit_priority(args, &r, sizeof(r), REC_IO_URING);
	return 0;
}

#endif /* HAVE_IO_URING_TP */
