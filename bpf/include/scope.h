/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The scope decision, made in the kernel: whether the current process is traced, and for
 * which sandbox. A process is traced once it is seen inside a sandbox cgroup's subtree (or
 * is forked by a traced process, see process.bpf.c); the decision is then remembered in
 * the traced map until the process exits.
 */
#ifndef SANDTRACE_SCOPE_H
#define SANDTRACE_SCOPE_H

#include "events.h"
#include "maps.h"
#include "counters.h"

#define MAX_CGROUP_DEPTH 16

/* The sandbox whose cgroup subtree holds the current task, or -1. */
static __always_inline s32 sandbox_of_cgroup(void)
{
#pragma unroll
	for (int level = 1; level <= MAX_CGROUP_DEPTH; level++) {
		u64 id = bpf_get_current_ancestor_cgroup_id(level);
		u32 *sb;

		if (!id)
			break;
		sb = sandbox_cgroups.lookup(&id);
		if (sb)
			return *sb;
	}
	return -1;
}

/* The sandbox index of the current process, or -1 when it is not traced. */
static __always_inline s32 lookup_sandbox(void)
{
#ifdef TRACE_ALL
	return 0;
#else
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct traced_val *v = traced.lookup(&tgid);
	struct traced_val nv = {};
	s32 sb;

	if (v)
		return v->sandbox;
	sb = sandbox_of_cgroup();
	if (sb < 0)
		return -1;
	nv.sandbox = sb;
	if (traced.update(&tgid, &nv) != 0)
		count_error(ERR_TRACED_MAP_FULL);
	return sb;
#endif
}

#endif /* SANDTRACE_SCOPE_H */
