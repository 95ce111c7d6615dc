/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Counting what went wrong: nothing the probes fail to do is lost silently. */
#ifndef SANDTRACE_COUNTERS_H
#define SANDTRACE_COUNTERS_H

#include "maps.h"

/* A record of this enum record_type that could not be delivered. */
static __always_inline void count_lost(u32 type)
{
	u64 *v = lost.lookup(&type);

	if (v)
		(*v)++;
}

/* A record about a process of sandbox `sandbox` that could not be delivered. */
static __always_inline void count_lost_in(u32 sandbox)
{
	u32 slot = sandbox < MAX_SANDBOXES ? sandbox : MAX_SANDBOXES - 1;
	u64 *v = lost_by_sandbox.lookup(&slot);

	if (v)
		(*v)++;
}

/* A failure of enum error_counter's kind. */
static __always_inline void count_error(u32 which)
{
	u64 *v = errors.lookup(&which);

	if (v)
		(*v)++;
}

#endif /* SANDTRACE_COUNTERS_H */
