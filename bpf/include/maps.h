/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Maps shared by every program, and the scope decision made in the kernel. */
#ifndef SANDTRACE_MAPS_H
#define SANDTRACE_MAPS_H

#include "events.h"
#include "offsets.h"

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024
#endif
#ifndef TRACED_MAX
#define TRACED_MAX 65536
#endif
#define MAX_CGROUP_DEPTH 16

struct traced_val {
	u32 sandbox;
	u32 _pad0;
};

/* Traced processes by thread-group id. Membership is sticky: a process enters when it is
 * first seen inside a sandbox cgroup or is forked by a traced parent, and leaves only when
 * it exits, wherever it moves in the cgroup tree meanwhile. */
BPF_HASH(traced, u32, struct traced_val, TRACED_MAX);

/* Roots of the traced cgroup subtrees: cgroup v2 id -> sandbox index. */
BPF_HASH(sandbox_cgroups, u64, u32, 1024);

BPF_PERCPU_ARRAY(lost, u64, REC_MAX);
BPF_PERCPU_ARRAY(errors, u64, ERR_MAX);

#ifdef USE_PERF_BUFFER
BPF_PERF_OUTPUT(events);
#else
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#endif

static __always_inline void count_lost(u32 type)
{
	u64 *v = lost.lookup(&type);

	if (v)
		(*v)++;
}

static __always_inline void count_error(u32 which)
{
	u64 *v = errors.lookup(&which);

	if (v)
		(*v)++;
}

/* Send a record to user space; a record that does not fit is counted, never lost silently. */
static __always_inline void emit(void *ctx, void *rec, u64 size, u32 type)
{
#ifdef USE_PERF_BUFFER
	if (events.perf_submit(ctx, rec, size) != 0)
		count_lost(type);
#else
	if (events.ringbuf_output(rec, size, 0) != 0)
		count_lost(type);
#endif
}

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

static __always_inline u32 ns_pid_of(u64 task)
{
	u64 pid = rd_u64(task, OFF_TASK_THREAD_PID);
	u32 level = rd_u32(pid, OFF_PID_LEVEL);

	if (!pid || level > 32)
		return 0;
	return rd_u32(pid + OFF_PID_NUMBERS + (u64)level * SIZE_UPID, OFF_UPID_NR);
}

static __always_inline void fill_header(struct record_header *h, u16 type, u32 size, u32 sandbox)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u64 uid_gid = bpf_get_current_uid_gid();
	u64 task = (u64)bpf_get_current_task();
	u64 leader = rd_u64(task, OFF_TASK_GROUP_LEADER);
	u64 parent = rd_u64(task, OFF_TASK_REAL_PARENT);

	h->type = type;
	h->version = SANDTRACE_LAYOUT_VERSION;
	h->size = size;
	h->ktime_ns = bpf_ktime_get_ns();
	h->cgroup_id = bpf_get_current_cgroup_id();
	h->start_ns = rd_u64(leader, OFF_TASK_START_TIME);
	h->pid = pid_tgid >> 32;
	h->tid = (u32)pid_tgid;
	h->ns_pid = ns_pid_of(leader);
	h->ppid = rd_u32(parent, OFF_TASK_TGID);
	h->uid = (u32)uid_gid;
	h->gid = uid_gid >> 32;
	h->sandbox = sandbox;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
}

#endif /* SANDTRACE_MAPS_H */
