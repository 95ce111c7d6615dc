/* SPDX-License-Identifier: GPL-2.0-only */
/* Process lifecycle: exec, fork, exit and cgroup moves of traced processes. These hooks are
 * scheduler and cgroup tracepoints, which cost nothing on other syscalls (unlike syscall
 * tracepoints, which put every syscall of every task on the slow path). */

#include "events.h"
#include "kernel_read.h"
#include "maps.h"
#include "counters.h"
#include "scope.h"
#include "output.h"
#include "sock_stash.h"

#ifndef NR_CPUS_POSSIBLE
#define NR_CPUS_POSSIBLE 256
#endif

/* Offsets into the exec scratch data are masked with EXEC_DATA_MASK so the verifier can see
 * every write stays inside the buffer; the buffer is larger than the mask by one read. */
#define EXEC_DATA_MASK 0x7fff
#define EXEC_DATA_CAP (EXEC_DATA_MASK + 1 + NAME_MAX_LEN)
#define EXEC_DATA_USED                                                   \
	(ARGV_MAX + ARGV_TAIL_MAX + 2 * PATH_BUDGET + FILENAME_MAX_LEN + \
	 STDIO_FDS * STDIO_PATH_BUDGET)

_Static_assert(EXEC_DATA_USED <= EXEC_DATA_MASK, "exec data budget exceeds its mask");

struct exec_scratch {
	u64 cursor; /* next free byte of data[]; not sent */
	struct exec_record rec;
	u8 data[EXEC_DATA_CAP];
};

/* One buffer per CPU, indexed by CPU id: larger than a per-CPU map value may be. */
BPF_ARRAY(exec_buf, struct exec_scratch, NR_CPUS_POSSIBLE);
BPF_PERCPU_ARRAY(move_buf, struct cgroup_move_record, 1);

/* How a walk_path() ended. */
enum walk_result {
	WALK_DONE = 0,
	WALK_TRUNCATED = 1,
	WALK_PSEUDO = 2,
};

/*
 * Write the components of a struct path into s->data at s->cursor, leaf first, each
 * NUL-terminated, crossing mount points up to the root of the mount namespace, as d_path
 * would, in at most `budget` bytes (more than NAME_MAX_LEN). Returns WALK_TRUNCATED if the
 * budget or the depth ran out before the root, and WALK_PSEUDO if the path is a pseudo
 * file's, which no path reaches (its dentry is its own parent: a memfd or an anonymous
 * inode), whose only component is then its name.
 *
 * The cursor lives in map memory on purpose: the verifier does not track values it loads
 * from a map, so every path through an iteration reaches the next with the same state and
 * is pruned, instead of the walk's branches multiplying across iterations.
 */
static __always_inline enum walk_result walk_path(struct exec_scratch *s, u64 path, u32 budget)
{
	u64 dentry = rd_u64(path, OFF_PATH_DENTRY);
	u64 vfsmnt = rd_u64(path, OFF_PATH_MNT);
	u64 mnt = vfsmnt - OFF_MOUNT_MNT;
	u64 mnt_root = rd_u64(vfsmnt, OFF_VFSMOUNT_MNT_ROOT);
	u64 start = s->cursor;

	if (!dentry || !vfsmnt)
		return WALK_TRUNCATED;
	for (int i = 0; i < PATH_MAX_DEPTH; i++) {
		u64 parent = rd_u64(dentry, OFF_DENTRY_D_PARENT);
		u64 off = s->cursor;
		long n;

		if (dentry == mnt_root) {
			u64 mnt_parent = rd_u64(mnt, OFF_MOUNT_MNT_PARENT);

			if (mnt_parent == mnt || !mnt_parent)
				return WALK_DONE;
			dentry = rd_u64(mnt, OFF_MOUNT_MNT_MOUNTPOINT);
			mnt = mnt_parent;
			mnt_root = rd_u64(mnt + OFF_MOUNT_MNT, OFF_VFSMOUNT_MNT_ROOT);
			continue;
		}
		if (off - start > budget - NAME_MAX_LEN)
			return WALK_TRUNCATED;
		n = bpf_probe_read_kernel_str(&s->data[off & EXEC_DATA_MASK], NAME_MAX_LEN,
					      (void *)rd_u64(dentry, OFF_DENTRY_D_NAME_NAME));
		if (n <= 0)
			return WALK_TRUNCATED;
		s->cursor = off + n;
		if (dentry == parent)
			return WALK_PSEUDO;
		dentry = parent;
	}
	return WALK_TRUNCATED;
}

/* The name the kernel gives a memfd_create file: "memfd:" and the caller's name. */
#define MEMFD_PREFIX "memfd:"

/* Whether the component written at s->data[off] starts with MEMFD_PREFIX. */
static __always_inline bool is_memfd_name(struct exec_scratch *s, u32 off)
{
	const char prefix[] = MEMFD_PREFIX;

#pragma unroll
	for (int i = 0; i < sizeof(prefix) - 1; i++) {
		if (s->data[(off + i) & EXEC_DATA_MASK] != prefix[i])
			return false;
	}
	return true;
}

#ifdef HAVE_STDIO_CAPTURE
#define S_IFMT 0170000
#define S_IFSOCK 0140000
#define S_IFCHR 0020000
#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10
#define KDEV_MINOR_BITS 20

#define SOCK_FIELD(sk, name) ((rd_u32(sk, WORD_##name) >> SHIFT_##name) & MASK_##name)

/* Terminals and /dev/null need no path: the collector names them by their device number. */
static __always_inline bool well_known_device(u32 rdev)
{
	u32 major = rdev >> KDEV_MINOR_BITS, minor = rdev & ((1U << KDEV_MINOR_BITS) - 1);

	return (major == 1 && minor == 3) || major == 4 || (major == 5 && minor <= 1) ||
	       (major >= 136 && major <= 143);
}

/* The name of unix socket sk for its stdio entry, written at s->cursor: its peer's address
 * when the peer is bound, else its own; nothing for an unbound pair. */
static __always_inline void unix_name(struct exec_scratch *s, struct stdio_fd *d, u64 sk)
{
	u64 peer = rd_u64(sk, OFF_UNIX_SOCK_PEER);
	u64 addr = peer ? rd_u64(peer, OFF_UNIX_SOCK_ADDR) : 0;
	u64 off = s->cursor;
	u32 len;

	if (!addr)
		addr = rd_u64(sk, OFF_UNIX_SOCK_ADDR);
	if (!addr)
		return;
	len = rd_u32(addr, OFF_UNIX_ADDRESS_LEN);
	if (len <= OFF_SOCKADDR_UN_PATH)
		return;
	len -= OFF_SOCKADDR_UN_PATH;
	if (len > UNIX_PATH_MAX) {
		len = UNIX_PATH_MAX;
		d->flags |= STDIO_F_TRUNCATED;
	}
	/* The compiler knows len <= UNIX_PATH_MAX and would drop a mask; the verifier needs one. */
	asm volatile("" : "+r"(len));
	len &= 0x7f;
	if (bpf_probe_read_kernel(&s->data[off & EXEC_DATA_MASK], len,
				  (void *)(addr + OFF_UNIX_ADDRESS_NAME + OFF_SOCKADDR_UN_PATH)) ==
	    0)
		s->cursor = off + len;
}

static __always_inline void describe_socket(struct exec_scratch *s, struct stdio_fd *d, u64 file)
{
	u64 sock = rd_u64(file, OFF_FILE_PRIVATE_DATA);
	u64 sk = sock ? rd_u64(sock, OFF_SOCKET_SK) : 0;

	if (!sk) {
		d->flags |= STDIO_F_UNREADABLE;
		return;
	}
	d->family = rd_u16(sk, OFF_SOCK_FAMILY);
	d->sock_type = SOCK_FIELD(sk, SOCK_TYPE);
	d->protocol = SOCK_FIELD(sk, SOCK_PROTOCOL);
	if (d->family == AF_INET || d->family == AF_INET6) {
		d->port = bpf_ntohs(rd_u16(sk, OFF_SOCK_DPORT));
		if (d->family == AF_INET)
			bpf_probe_read_kernel(d->addr, 4, (void *)(sk + OFF_SOCK_DADDR));
		else
			bpf_probe_read_kernel(d->addr, 16, (void *)(sk + OFF_SOCK_V6_DADDR));
	} else if (d->family == AF_UNIX) {
		unix_name(s, d, sk);
	}
}

/*
 * Describe fds 0, 1 and 2 of the exec'ing task in r->stdio, their names at s->cursor: what
 * the process was given to read and write, captured before it can exit. The fd table is the
 * task's own by now (exec unshared it) and its close-on-exec fds are closed.
 */
static __always_inline void capture_stdio(struct exec_scratch *s, u64 task)
{
	struct exec_record *r = &s->rec;
	u64 files = rd_u64(task, OFF_TASK_FILES);
	u64 fdt = files ? rd_u64(files, OFF_FILES_FDT) : 0;
	u32 max_fds = fdt ? rd_u32(fdt, OFF_FDTABLE_MAX_FDS) : 0;
	u64 fds = fdt ? rd_u64(fdt, OFF_FDTABLE_FD) : 0;

	r->flags |= EXEC_F_STDIO;
	for (u32 i = 0; i < STDIO_FDS; i++) {
		struct stdio_fd *d = &r->stdio[i];
		u64 file, inode, start = s->cursor;
		u32 type;

		if (!fds) {
			d->flags = STDIO_F_UNREADABLE;
			continue;
		}
		if (i >= max_fds)
			continue;
		file = rd_u64(fds, i * sizeof(u64));
		if (!file)
			continue;
		d->flags = STDIO_F_OPEN;
		inode = rd_u64(file, OFF_FILE_F_INODE);
		if (!inode) {
			d->flags |= STDIO_F_UNREADABLE;
			continue;
		}
		d->ino = rd_u64(inode, OFF_INODE_I_INO);
		d->mode = rd_u16(inode, OFF_INODE_I_MODE);
		d->rdev = rd_u32(inode, OFF_INODE_I_RDEV);
		type = d->mode & S_IFMT;
		if (type == S_IFSOCK) {
			describe_socket(s, d, file);
		} else if (type != S_IFCHR || !well_known_device(d->rdev)) {
			u64 dentry = rd_u64(file, OFF_FILE_F_PATH + OFF_PATH_DENTRY);
			u64 dop = rd_u64(dentry, OFF_DENTRY_D_OP);

			d->flags |= STDIO_F_PATH;
			if (dop && rd_u64(dop, OFF_DENTRY_OPS_D_DNAME)) {
				/* Its file system makes its name up (pipe:[N],
				 * anon_inode:[eventfd]), as readlink shows it: only the
				 * dentry's own name is kept. */
				u64 off = s->cursor;
				long n = bpf_probe_read_kernel_str(
					&s->data[off & EXEC_DATA_MASK], NAME_MAX_LEN,
					(void *)rd_u64(dentry, OFF_DENTRY_D_NAME_NAME));

				d->flags |= STDIO_F_DNAME;
				if (n > 0)
					s->cursor = off + n;
			} else {
				enum walk_result walk =
					walk_path(s, file + OFF_FILE_F_PATH, STDIO_PATH_BUDGET);

				if (walk == WALK_TRUNCATED)
					d->flags |= STDIO_F_TRUNCATED;
				else if (walk == WALK_PSEUDO)
					d->flags |= STDIO_F_PSEUDO;
			}
			if (rd_u32(inode, OFF_INODE_I_NLINK) == 0)
				d->flags |= STDIO_F_UNLINKED;
		}
		d->name_size = s->cursor - start;
	}
}
#endif /* HAVE_STDIO_CAPTURE */

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u32 cpu = bpf_get_smp_processor_id(), off = 0;
	s32 sb = lookup_sandbox();
	struct exec_scratch *s;
	struct exec_record *r;
	u64 task, mm, file, fs, arg_start, arg_end, len, tail = 0, inode, size;
	enum walk_result walk;

	if (sb < 0)
		return 0;
	s = exec_buf.lookup(&cpu);
	if (!s) {
		count_error(ERR_SCRATCH);
		return 0;
	}
	r = &s->rec;
	__builtin_memset(r, 0, sizeof(*r));
	fill_header(&r->hdr, REC_EXEC, 0, sb);
	r->old_tid = args->old_pid;

	task = (u64)bpf_get_current_task();
	mm = rd_u64(task, OFF_TASK_MM);
	if (!mm) {
		r->flags |= EXEC_F_NO_MM;
		goto emit_empty;
	}
	arg_start = rd_u64(mm, OFF_MM_ARG_START);
	arg_end = rd_u64(mm, OFF_MM_ARG_END);
	len = arg_end > arg_start ? arg_end - arg_start : 0;
	r->argv_full_size = len > 0xffffffff ? 0xffffffff : len;
	/* A long argv is kept as its head and its tail: arguments that matter cannot be pushed
	 * out of sight by padding placed before them. */
	if (len > ARGV_MAX) {
		tail = len - ARGV_MAX;
		if (tail > ARGV_TAIL_MAX) {
			tail = ARGV_TAIL_MAX;
			r->flags |= EXEC_F_ARGV_TRUNCATED;
		}
		len = ARGV_MAX;
	}
	if (len && bpf_probe_read_user(s->data, len, (void *)arg_start) == 0)
		r->argv_size = len;
	else if (len)
		r->flags |= EXEC_F_ARGV_TRUNCATED;
	/* The tail follows a full head only, so that it always starts at ARGV_MAX. */
	if (tail && r->argv_size == ARGV_MAX) {
		if (bpf_probe_read_user(&s->data[ARGV_MAX], tail, (void *)(arg_end - tail)) == 0)
			r->argv_tail_size = tail;
		else
			r->flags |= EXEC_F_ARGV_TRUNCATED;
	} else if (tail) {
		r->flags |= EXEC_F_ARGV_TRUNCATED;
	}
	off = r->argv_size + r->argv_tail_size;

	file = rd_u64(mm, OFF_MM_EXE_FILE);
	if (file) {
		inode = rd_u64(file, OFF_FILE_F_INODE);
		r->exe_ino = rd_u64(inode, OFF_INODE_I_INO);
		r->exe_nlink = rd_u32(inode, OFF_INODE_I_NLINK);
		if (r->exe_nlink == 0)
			r->flags |= EXEC_F_UNLINKED;
#ifdef HAVE_EXE_FILE_KEY
		r->exe_dev = rd_u32(rd_u64(inode, OFF_INODE_I_SB), OFF_SUPER_BLOCK_S_DEV);
		/* Nanoseconds are below 2^30; kernels since 6.13 keep a flag in bit 31
		 * (I_CTIME_QUERIED: stat asked for it). */
		r->exe_ctime_ns = rd_u64(inode, OFF_INODE_I_CTIME_SEC) * 1000000000ULL +
				  (rd_u32(inode, OFF_INODE_I_CTIME_NSEC) & 0x3fffffff);
		r->exe_file_size = rd_u64(inode, OFF_INODE_I_SIZE);
		r->flags |= EXEC_F_FILE_KEY;
#endif
		s->cursor = off;
		walk = walk_path(s, file + OFF_FILE_F_PATH, PATH_BUDGET);
		if (walk == WALK_TRUNCATED)
			r->flags |= EXEC_F_EXE_TRUNCATED;
		/* A memfd is a pseudo file named "memfd:...". A deleted file of that name still
		 * has its directory for a parent, so it is not taken for one. */
		else if (walk == WALK_PSEUDO && is_memfd_name(s, off))
			r->flags |= EXEC_F_MEMFD;
		off = s->cursor & EXEC_DATA_MASK;
	} else {
		r->flags |= EXEC_F_EXE_TRUNCATED;
	}
	r->exe_size = off - r->argv_size - r->argv_tail_size;

	fs = rd_u64(task, OFF_TASK_FS);
	if (fs) {
		u32 before = off;

		s->cursor = off;
		if (walk_path(s, fs + OFF_FS_PWD, PATH_BUDGET) == WALK_TRUNCATED)
			r->flags |= EXEC_F_CWD_TRUNCATED;
		off = s->cursor & EXEC_DATA_MASK;
		r->cwd_size = off - before;
	}

	{
		long n = bpf_probe_read_kernel_str(&s->data[off & EXEC_DATA_MASK], FILENAME_MAX_LEN,
						   (void *)args +
							   (args->data_loc_filename & 0xffff));
		if (n > 0) {
			r->filename_size = n;
			if (n == FILENAME_MAX_LEN)
				r->flags |= EXEC_F_FILENAME_TRUNCATED;
			off += n;
		}
	}

emit_empty:
#ifdef HAVE_STDIO_CAPTURE
	s->cursor = off & EXEC_DATA_MASK;
	capture_stdio(s, task);
	off = s->cursor;
#endif
	size = sizeof(*r) + (off & EXEC_DATA_MASK);
	r->hdr.size = size;
	emit_priority(args, r, size, REC_EXEC);
	return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	u64 child = ctx->args[1];
	u32 child_pid = rd_u32(child, OFF_TASK_PID);
	struct traced_val v = {};
	struct fork_record r = {};
	s32 sb;

	/* New threads are not new processes; their events carry the thread-group id. */
	if (rd_u32(child, OFF_TASK_TGID) != child_pid)
		return 0;
	sb = lookup_sandbox();
	if (sb < 0)
		return 0;
#ifndef TRACE_ALL
	v.sandbox = sb;
	if (traced.update(&child_pid, &v) != 0)
		count_error(ERR_TRACED_MAP_FULL);
#endif
	fill_header(&r.hdr, REC_FORK, sizeof(r), sb);
	r.child_pid = child_pid;
	r.child_start_ns = rd_u64(child, OFF_TASK_START_TIME);
	emit_priority(ctx, &r, sizeof(r), REC_FORK);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
	struct exit_record r = {};
	s32 sb;
	int group_dead;

#ifdef TRACE_ALL
	sb = 0;
#else
	struct traced_val *v = traced.lookup(&tgid);

	if (!v)
		return 0;
	sb = v->sandbox;
#endif
	forget_thread(args, tid);
#ifdef HAVE_EXIT_GROUP_DEAD
	group_dead = args->group_dead;
#else
	group_dead = tid == tgid;
#endif
	if (!group_dead)
		return 0;
	fill_header(&r.hdr, REC_EXIT, sizeof(r), sb);
	r.exit_code = rd_u32((u64)bpf_get_current_task(), OFF_TASK_EXIT_CODE);
	emit_priority(args, &r, sizeof(r), REC_EXIT);
#ifndef TRACE_ALL
	traced.delete(&tgid);
#endif
	return 0;
}

TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
	u32 zero = 0, target = args->pid;
	struct cgroup_move_record *r;
	struct traced_val *v;
	long n;

	/* cgroup.procs moves every thread; the leader's move (tid == tgid) stands for them. */
	v = traced.lookup(&target);
	if (!v)
		return 0;
	r = move_buf.lookup(&zero);
	if (!r) {
		count_error(ERR_SCRATCH);
		return 0;
	}
	fill_header(&r->hdr, REC_CGROUP_MOVE, sizeof(*r), v->sandbox);
	r->target_pid = target;
	r->dst_cgroup_id = args->dst_id;
	r->dst_level = args->dst_level;
	n = bpf_probe_read_kernel_str(r->dst_path, sizeof(r->dst_path),
				      (void *)args + (args->data_loc_dst_path & 0xffff));
	r->path_size = n > 0 ? n : 0;
	emit(args, r, sizeof(*r), REC_CGROUP_MOVE);
	return 0;
}
