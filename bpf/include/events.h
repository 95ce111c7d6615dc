/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The one definition of every record that crosses from the kernel to sandtrace's collector.
 *
 * Rules for this file (checked by tests/unit/test_layout.py, which compiles it with the host
 * compiler and compares every member, size, offset, enumerator and flag with the record
 * classes and constants of collector/records.py):
 *   - fixed-width types only, no bool/long/pointers/bitfields;
 *   - explicit padding (_padN members; the test compiles with -Wpadded), every struct a
 *     multiple of 8 bytes, byte arrays at a multiple of 8 (the Python side places them so);
 *   - the record type is the first field; type 0 is undefined;
 *   - any change to a layout bumps SANDTRACE_LAYOUT_VERSION.
 */
#ifndef SANDTRACE_EVENTS_H
#define SANDTRACE_EVENTS_H

#ifdef SANDTRACE_HOST_BUILD
#include <linux/types.h>
#endif

#define SANDTRACE_LAYOUT_VERSION 7

#define TASK_COMM_LEN 16

/* Variable parts of an exec record. ARGV_MAX must be a power of two. An argv longer than
 * ARGV_MAX is kept as its first ARGV_MAX bytes and its last ARGV_TAIL_MAX bytes: padding
 * placed before the arguments that matter does not hide them. */
#define ARGV_MAX 16384
#define ARGV_TAIL_MAX 4096
#define PATH_BUDGET 4096
#define FILENAME_MAX_LEN 256
#define PATH_MAX_DEPTH 40
#define NAME_MAX_LEN 256
/* The standard streams (fds 0, 1, 2) described in an exec record, and the bytes of data[]
 * each one's path walk may take. */
#define STDIO_FDS 3
#define STDIO_PATH_BUDGET 768

enum record_type {
	REC_UNDEFINED = 0,
	REC_EXEC = 1,
	REC_FORK = 2,
	REC_EXIT = 3,
	REC_CONNECT = 4,
	REC_TCP_STATE = 5,
	REC_BIND = 6,
	REC_CGROUP_MOVE = 7,
	REC_UNIX_CONNECT = 8,
	REC_SOCK_CREATE = 9,
	REC_IO_URING = 10,
	REC_FLOW = 11,
	REC_DNS = 12,
	REC_MAX = 13,
};

/* Failures that cost a probe some of its state, not a record: each indexes the per-CPU
 * errors map (maps.h), which the collector sums and reports by name. */
enum error_counter {
	ERR_TRACED_MAP_FULL = 0, /* a traced process could not be remembered in the traced map */
	ERR_STASH_MAP_FULL = 1, /* a connect or bind could not be kept for the hook completing it */
	ERR_SCRATCH = 2, /* no scratch buffer to build an exec or cgroup move record in */
	ERR_MAX = 3,
};

/* Common header: the process context at the moment of the event. 80 bytes. */
struct record_header {
	__u16 type;
	__u16 version;
	__u32 size; /* whole record, header included */
	__u64 ktime_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
	__u64 cgroup_id; /* cgroup v2 id of the task at the event */
	__u64 start_ns; /* start time of the thread-group leader: with pid, the process key */
	__u32 pid; /* thread-group id as the host sees it */
	__u32 tid;
	__u32 ns_pid; /* pid inside the task's own pid namespace */
	__u32 ppid; /* real parent's thread-group id */
	__u32 uid;
	__u32 gid;
	__u32 sandbox; /* index of the scope that made the task traced */
	__u32 _pad0;
	char comm[TASK_COMM_LEN];
};

#define EXEC_F_ARGV_TRUNCATED (1U << 0) /* bytes of argv between head and tail are missing */
#define EXEC_F_EXE_TRUNCATED (1U << 1)
#define EXEC_F_CWD_TRUNCATED (1U << 2)
#define EXEC_F_FILENAME_TRUNCATED (1U << 3)
#define EXEC_F_MEMFD (1U << 4) /* executable is an anonymous memory file (memfd_create) */
#define EXEC_F_UNLINKED (1U << 5) /* executable file has no links left */
#define EXEC_F_NO_MM (1U << 6)
#define EXEC_F_STDIO (1U << 7) /* stdio[] was filled in (the kernel has what it reads) */
#define EXEC_F_FILE_KEY (1U << 8) /* exe_dev, exe_ctime_ns, exe_file_size were filled in */

#define STDIO_F_OPEN (1U << 0) /* the fd is open; without it, closed */
#define STDIO_F_UNREADABLE (1U << 1) /* the fd table or the file could not be read */
#define STDIO_F_PATH (1U << 2) /* its name in data[] is a file path, components leaf first */
#define STDIO_F_PSEUDO (1U << 3) /* no path reaches it: its name is its one component */
#define STDIO_F_TRUNCATED (1U << 4) /* the name is cut short (the path's leaf end kept) */
#define STDIO_F_UNLINKED (1U << 5) /* the file has no links left */
#define STDIO_F_DNAME (1U << 6) /* its file system names it (pipe, anon inode): leaf in data */

/* One standard stream of a process at exec: the open file's inode, and for a socket its
 * family, type, protocol and peer. A unix socket's name (the peer's when it has one, else its
 * own; sun_path's bytes, an abstract name's starting with NUL) or a file's path goes in the
 * record's data[]. */
struct stdio_fd {
	__u64 ino;
	__u8 addr[16]; /* an inet socket's peer address (IPv4: its first 4 bytes) */
	__u32 flags; /* STDIO_F_* */
	__u32 mode; /* i_mode: its S_IFMT bits are the file's type */
	__u32 rdev; /* a device's number as the kernel encodes it: major << 20 | minor */
	__u32 name_size; /* bytes of this stream's name in data[] */
	__u16 family;
	__u16 sock_type;
	__u16 protocol;
	__u16 port; /* an inet socket's peer port, host byte order */
};

/*
 * data[] holds, back to back: argv's head (argv_size bytes, NUL-separated, as the kernel laid
 * it out), argv's tail (argv_tail_size bytes: the last bytes of argv, which follow the head
 * directly when argv_size + argv_tail_size == argv_full_size, else begin inside an argument),
 * the executable's path components leaf first (each NUL-terminated), the working directory's
 * components leaf first, the file name given to execve, and the names of the standard
 * streams 0, 1, 2 (stdio[i].name_size bytes each).
 */
struct exec_record {
	struct record_header hdr;
	__u64 exe_ino;
	__u32 flags;
	__u32 argv_size; /* bytes of argv captured */
	__u32 argv_full_size; /* bytes of argv the process has */
	__u32 exe_size;
	__u32 cwd_size;
	__u32 filename_size;
	__u32 exe_nlink;
	__u32 old_tid; /* thread that called execve, before de_thread */
	__u32 argv_tail_size; /* bytes of argv's end captured after the head */
	/* With EXEC_F_FILE_KEY, the executed file's version as stat(2) would tell it: the
	 * collector's identity cache is keyed on it, so a known file costs no system call. */
	__u32 exe_dev; /* the kernel's dev_t of its file system: major << 20 | minor */
	__u64 exe_ctime_ns; /* its inode's change time */
	__u64 exe_file_size;
	struct stdio_fd stdio[STDIO_FDS];
	__u8 data[];
};

struct fork_record {
	struct record_header hdr; /* the parent */
	__u64 child_start_ns;
	__u32 child_pid;
	__u32 _pad0;
};

struct exit_record {
	struct record_header hdr;
	__u32 exit_code; /* as wait(2) encodes it: status << 8 | signal */
	__u32 _pad0;
};

#define SOCK_F_NONBLOCK (1U << 0)
#define SOCK_F_LOCAL_KNOWN (1U << 1)
#define SOCK_F_REPEATS_ONLY (1U << 2) /* a report of repeats counted in the kernel, no connect */
#define SOCK_F_UNCONNECTED (1U << 3) /* a datagram sent to this destination without connect() */
#define SOCK_F_DENIED (1U << 4) /* refused by the sandbox's egress policy (--enforce): EPERM */

/* Written at the cgroup connect hook: the attempt, before the protocol acts on it. A process
 * connecting to one destination again within a window is counted in the kernel, not sent:
 * the next record for that destination carries the count (repeats), or, when none comes, a
 * report the collector drains from the kernel's map (SOCK_F_REPEATS_ONLY). */
struct connect_record {
	struct record_header hdr;
	__u64 cookie; /* socket cookie; joins TCP outcome records */
	__u8 daddr[16];
	__u8 saddr[16];
	__u16 family;
	__u16 dport; /* host byte order */
	__u16 sport;
	__u16 _pad0;
	__u32 sock_type;
	__u32 protocol;
	__u32 flags;
	__u32 repeats; /* connects to this destination counted, not sent, since the last record */
};

/* TCP progress of a socket that a traced process connected or listened on. Outcome records
 * (ESTABLISHED, CLOSE) come from softirq context: their header process fields are copied
 * from the connecting thread. */
struct tcp_state_record {
	struct record_header hdr;
	__u64 cookie;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u16 _pad0;
	__s32 oldstate;
	__s32 newstate;
	__s32 err; /* sk_err when the socket closed */
	__u32 flags;
};

#define BIND_F_FAILED (1U << 0) /* the bind hook saw the call, the bind did not complete */
#define BIND_F_REQUEST_KNOWN (1U << 1)

struct bind_record {
	struct record_header hdr;
	__u64 cookie;
	__u8 req_addr[16];
	__u8 addr[16]; /* bound address */
	__u16 family;
	__u16 req_port;
	__u16 port; /* bound port (the kernel's choice for port 0) */
	__u16 _pad0;
	__u32 sock_type;
	__u32 protocol;
	__u32 flags;
	__u32 _pad1;
};

#define CGROUP_PATH_MAX 256

struct cgroup_move_record {
	struct record_header hdr; /* the task that did the move */
	__u64 dst_cgroup_id;
	__u32 target_pid; /* the process that was moved */
	__s32 dst_level;
	__u32 path_size;
	__u32 _pad0;
	char dst_path[CGROUP_PATH_MAX];
};

#define UNIX_PATH_MAX 108

/* Written at the cgroup unix connect hook (Linux 6.7+), which runs before the path is looked
 * up: the socket named need not exist. */
struct unix_connect_record {
	struct record_header hdr;
	__u64 cookie;
	__u32 sock_type;
	__u32 path_size; /* bytes of sun_path the caller gave; an abstract name starts with NUL */
	char path[UNIX_PATH_MAX];
	__u32 flags; /* UNIX_F_* */
};

#define UNIX_F_DENIED (1U << 0) /* a container runtime's socket, refused (--enforce): EPERM */

/* A raw IP socket a traced process made (the cgroup sock_create hook, which sees inet
 * sockets only). */
struct sock_create_record {
	struct record_header hdr;
	__u64 cookie;
	__u32 family;
	__u32 sock_type;
	__u32 protocol;
	__u32 _pad0;
};

/* An io_uring instance a traced process set up (io_uring:io_uring_create). */
struct io_uring_record {
	struct record_header hdr;
	__s32 fd;
	__u32 sq_entries;
	__u32 cq_entries;
	__u32 flags; /* IORING_SETUP_* */
};

/* What a flow speaks, told from its first bytes in one direction (flows.h). */
enum app_protocol {
	APP_UNKNOWN = 0, /* payload that matched none of the others */
	APP_SSH = 1, /* "SSH-2.0-" or "SSH-1.99-" */
	APP_TLS = 2, /* a TLS handshake record holding a ClientHello (or, inbound, ServerHello) */
	APP_HTTP = 3, /* an HTTP/1 request line (or, inbound, "HTTP/1.") */
	APP_STRATUM = 4, /* JSON-RPC naming a mining method: "login", "mining.*" */
	APP_DNS = 5, /* port 53 */
	APP_MAX = 6,
};

#define FLOW_PAYLOAD_MAX 256
#define FLOW_F_INGRESS (1U << 0) /* the payload came in; else it went out */

/* The first packet with payload in one direction of a socket a traced process made (one
 * record per socket and direction), from the cgroup_skb programs, which run in no process's
 * context: the header is the socket maker's, kept by socket cookie (sock_create.bpf.c). */
struct flow_record {
	struct record_header hdr;
	__u64 cookie;
	__u8 laddr[16]; /* the socket's own address */
	__u8 raddr[16]; /* the peer's */
	__u16 family;
	__u16 lport;
	__u16 rport;
	__u16 protocol; /* IPPROTO_TCP or IPPROTO_UDP */
	__u32 app; /* enum app_protocol, as the kernel told it */
	__u32 flags; /* FLOW_F_* */
	__u32 payload_size; /* bytes of payload captured */
	__u32 payload_full; /* bytes of payload the packet had */
	__u8 payload[FLOW_PAYLOAD_MAX];
};

#define DNS_PAYLOAD_MAX 512

/* A DNS message from port 53 that reached a socket a traced process made (UDP, or a TCP
 * segment, whose 2-byte length prefix is skipped), as it arrived: user space parses it
 * whole. The kernel has already entered its A and AAAA answers in the dns_names map. */
struct dns_record {
	struct record_header hdr;
	__u64 cookie;
	__u8 server[16]; /* the address the answer came from */
	__u16 family;
	__u16 server_port;
	__u16 protocol;
	__u16 _pad0;
	__u32 payload_size; /* bytes of the message captured */
	__u32 payload_full; /* bytes of the message in the packet */
	__u32 mapped; /* A and AAAA answers the kernel entered in dns_names */
	__u32 _pad1;
	__u8 payload[DNS_PAYLOAD_MAX];
};

#endif /* SANDTRACE_EVENTS_H */
