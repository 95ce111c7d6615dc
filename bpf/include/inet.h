/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Socket constants the probes test (uapi values, the same on every kernel), and the copies of
 * addresses from socket contexts into records. */
#ifndef SANDTRACE_INET_H
#define SANDTRACE_INET_H

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define IPPROTO_TCP 6

/* An IPv4 address, given as the 32-bit word (network byte order) a socket context holds. */
static __always_inline void copy_ip4(u8 *dst, u32 addr)
{
	__builtin_memcpy(dst, &addr, 4);
}

/* An IPv6 address from the four 32-bit words (network byte order) of a socket context
 * (bpf_sock_addr.user_ip6, bpf_sock.src_ip6). Each word is loaded on its own: the verifier
 * accepts context fields only as whole, aligned loads, never as a 16-byte copy. */
static __always_inline void copy_ip6(u8 *dst, const u32 *words)
{
	u32 w[4] = { words[0], words[1], words[2], words[3] };

	__builtin_memcpy(dst, w, 16);
}

#endif /* SANDTRACE_INET_H */
