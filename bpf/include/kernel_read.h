/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Reads of kernel memory, and the kernel struct offsets they go through. The offsets are
 * resolved by probes/btf.py from the running kernel's BTF and passed in as -D flags. Nothing
 * here may come from the installed kernel headers: on hosts whose headers belong to another
 * kernel those layouts are wrong.
 */
#ifndef SANDTRACE_KERNEL_READ_H
#define SANDTRACE_KERNEL_READ_H

#if !defined(OFF_TASK_PID) || !defined(OFF_TASK_TGID) || !defined(OFF_TASK_REAL_PARENT) ||       \
	!defined(OFF_TASK_GROUP_LEADER) || !defined(OFF_TASK_START_TIME) ||                      \
	!defined(OFF_TASK_EXIT_CODE) || !defined(OFF_TASK_MM) || !defined(OFF_TASK_FS) ||        \
	!defined(OFF_TASK_THREAD_PID) || !defined(OFF_PID_LEVEL) || !defined(OFF_PID_NUMBERS) || \
	!defined(OFF_UPID_NR) || !defined(SIZE_UPID) || !defined(OFF_MM_ARG_START) ||            \
	!defined(OFF_MM_ARG_END) || !defined(OFF_MM_EXE_FILE) || !defined(OFF_FS_PWD) ||         \
	!defined(OFF_PATH_MNT) || !defined(OFF_PATH_DENTRY) || !defined(OFF_FILE_F_PATH) ||      \
	!defined(OFF_FILE_F_INODE) || !defined(OFF_FILE_F_FLAGS) || !defined(OFF_INODE_I_INO) || \
	!defined(OFF_INODE_I_NLINK) || !defined(OFF_DENTRY_D_PARENT) ||                          \
	!defined(OFF_DENTRY_D_NAME_NAME) || !defined(OFF_VFSMOUNT_MNT_ROOT) ||                   \
	!defined(OFF_MOUNT_MNT) || !defined(OFF_MOUNT_MNT_PARENT) ||                             \
	!defined(OFF_MOUNT_MNT_MOUNTPOINT) || !defined(OFF_SOCK_SK_SOCKET) ||                    \
	!defined(OFF_SOCK_SK_ERR) || !defined(OFF_SOCKET_FILE)
#error "kernel offsets missing: build through probes/loader.py, which reads them from BTF"
#endif

static __always_inline u64 rd_u64(u64 base, u32 off)
{
	u64 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

static __always_inline u32 rd_u32(u64 base, u32 off)
{
	u32 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

static __always_inline u16 rd_u16(u64 base, u32 off)
{
	u16 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

/* The pid of a task (of its thread-group leader, for the process) inside the task's own pid
 * namespace: the last of struct pid's numbers; 0 when it cannot be read. */
static __always_inline u32 ns_pid_of(u64 task)
{
	u64 pid = rd_u64(task, OFF_TASK_THREAD_PID);
	u32 level = rd_u32(pid, OFF_PID_LEVEL);

	if (!pid || level > 32)
		return 0;
	return rd_u32(pid + OFF_PID_NUMBERS + (u64)level * SIZE_UPID, OFF_UPID_NR);
}

#endif /* SANDTRACE_KERNEL_READ_H */
