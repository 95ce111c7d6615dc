/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The maps that user space reads or writes by name (probes/loader.py): scope membership and
 * the loss and error counters. Maps private to one hook live with it; the output map is in
 * output.h and the per-thread socket stashes in sock_stash.h.
 */
#ifndef SANDTRACE_MAPS_H
#define SANDTRACE_MAPS_H

#include "events.h"

#ifndef TRACED_MAX
#define TRACED_MAX 65536
#endif

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

/* Records that could not be delivered, indexed by enum record_type (slot 0: records of no
 * known type, which user space adds to from the perf buffer's own loss count). */
BPF_PERCPU_ARRAY(lost, u64, REC_MAX);

#define MAX_SANDBOXES 1024

/* Records that could not be delivered, by the sandbox index of the process they were about
 * (the last slot also takes any index beyond it). */
BPF_PERCPU_ARRAY(lost_by_sandbox, u64, MAX_SANDBOXES);

/* Failures that cost a probe some of its state, indexed by enum error_counter. */
BPF_PERCPU_ARRAY(errors, u64, ERR_MAX);

#endif /* SANDTRACE_MAPS_H */
