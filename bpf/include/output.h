/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Records out to user space: the output map (a BPF ring buffer, or a perf buffer where the
 * kernel has no ring buffer or the user asks for one), the common header every record starts
 * with, and emit(), which counts any record that does not fit.
 */
#ifndef SANDTRACE_OUTPUT_H
#define SANDTRACE_OUTPUT_H

#include "events.h"
#include "kernel_read.h"
#include "counters.h"

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024
#endif
/* The priority ring: exec, fork, exit, first sightings. Small: what goes there is rare. */
#ifndef PRIORITY_RINGBUF_PAGES
#define PRIORITY_RINGBUF_PAGES 128
#endif

#ifdef USE_PERF_BUFFER
BPF_PERF_OUTPUT(events);
#else
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_RINGBUF_OUTPUT(priority_events, PRIORITY_RINGBUF_PAGES);
#endif

/* Send a record to user space; a record that does not fit is counted, never lost silently. */
static __always_inline void emit(void *ctx, void *rec, u64 size, u32 type)
{
#ifdef USE_PERF_BUFFER
	if (events.perf_submit(ctx, rec, size) == 0)
		return;
#else
	if (events.ringbuf_output(rec, size, 0) == 0)
		return;
#endif
	count_lost(type);
	count_lost_in(((struct record_header *)rec)->sandbox);
}

/* Send a record that a flood of others must not crowd out (exec, fork, exit, a process's
 * first connect to a destination): the priority ring, which only such records use, then,
 * when that is full, the main ring. (The perf buffer has one path for all.) */
static __always_inline void emit_priority(void *ctx, void *rec, u64 size, u32 type)
{
#ifdef USE_PERF_BUFFER
	emit(ctx, rec, size, type);
#else
	if (priority_events.ringbuf_output(rec, size, 0) != 0 &&
	    events.ringbuf_output(rec, size, 0) != 0) {
		count_lost(type);
		count_lost_in(((struct record_header *)rec)->sandbox);
	}
#endif
}

/* The header of a record about the current task. */
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

#endif /* SANDTRACE_OUTPUT_H */
