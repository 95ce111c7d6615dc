/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Egress enforcement (built with -DHAVE_ENFORCE, `--enforce`): the verdict the sandbox
 * cgroups' own hooks give (connect4/6 in sock_addr.bpf.c, unconnected UDP datagrams in
 * skb_egress.bpf.c, unix connects in unix_connect.bpf.c), and the allow entries learnt from
 * DNS answers (flows.h) before the answer reaches the process. Nothing here runs for a
 * process outside the sandboxes: the hooks are attached to the sandbox cgroups only.
 *
 * The policy is written by user space (collector/enforce.py) as rules numbered per sandbox,
 * one bit each of a 64-bit mask: every allow entry (a network in enf_nets, a name in
 * enf_names, an address learnt for a name in enf_learned) carries the mask of the rules that
 * allow it, and a sandbox's enf_sandbox says which rules allow which ports. A destination is
 * allowed when a rule allows both its address and its port.
 */
#ifndef SANDTRACE_ENFORCE_H
#define SANDTRACE_ENFORCE_H

#include "events.h"
#include "maps.h"
#include "inet.h"
#include "counters.h"

/* An address a sandbox resolved: which sandbox, which address (an IPv4 one in its first 4
 * bytes). The key of dns_names (flows.h), enf_resolvers and enf_learned. */
struct dns_addr_key {
	u32 sandbox;
	u16 family;
	u16 _pad0;
	u8 addr[16];
};

#ifdef HAVE_ENFORCE

#define ENF_RANGES_MAX 32
#define ENF_LEARNED_MAX 65536
#define ENF_NETS_MAX 16384
#define ENF_NAMES_MAX 16384
#define ENF_UNIX_MAX 256
#define ENF_DNS_PORT 53
#define FNV64_OFFSET_ENF 0xcbf29ce484222325ULL
#define FNV64_PRIME_ENF 0x100000001b3ULL

#define ENF_F_ON (1U << 0) /* the sandbox is held to a policy */
#define ENF_F_LOOPBACK (1U << 1) /* 127.0.0.0/8 and ::1 pass without an entry */

#define ENF_NAME_EXACT 0
#define ENF_NAME_WILDCARD 1 /* names strictly below the hashed one */

/* What was denied, indexing enf_denied. */
enum enf_kind {
	ENF_DENIED_CONNECT = 0,
	ENF_DENIED_SEND = 1, /* a datagram sent without connect */
	ENF_DENIED_RESOLVER = 2, /* DNS (port 53) to a server not among the resolvers */
	ENF_DENIED_UNIX = 3,
	ENF_KINDS = 4,
};

struct enf_range {
	u16 first;
	u16 last;
	u32 _pad0;
	u64 rules; /* rules that allow ports first..last */
};

/* A sandbox's policy, by sandbox index. */
struct enf_sandbox {
	u32 flags; /* ENF_F_* */
	u32 nranges;
	u64 any_port; /* rules that allow every port */
	u64 floor_ns; /* least life of an address learnt from a DNS answer */
	struct enf_range ranges[ENF_RANGES_MAX];
};

/* A network of the sandbox's policy: a longest-prefix-match key whose data is the sandbox
 * index (always matched whole) and the address as IPv6 (IPv4 as ::ffff:a.b.c.d). */
struct enf_net_key {
	u32 prefixlen;
	u32 sandbox;
	u8 addr[16];
};

struct enf_name_key {
	u64 hash; /* dns_name_hash of the name (a wildcard's: of the domain below which) */
	u32 sandbox;
	u32 kind; /* ENF_NAME_* */
};

/* An address learnt from a DNS answer for an allowed name, until it expires. */
struct enf_learned_val {
	u64 expires_ns; /* bpf_ktime_get_ns() clock */
	u64 rules;
};

/* The basename of a unix socket path that no sandbox may connect to (a container runtime's),
 * FNV-1a 64 of its bytes. */
struct enf_unix_key {
	u64 hash;
};

BPF_HASH(enf_sandboxes, u32, struct enf_sandbox, MAX_SANDBOXES);
BPF_F_TABLE("lpm_trie", struct enf_net_key, u64, enf_nets, ENF_NETS_MAX, BPF_F_NO_PREALLOC);
BPF_HASH(enf_names, struct enf_name_key, u64, ENF_NAMES_MAX);
/* Resolvers: (sandbox, family, address), the key of dns_names; the value is unused. */
BPF_HASH(enf_resolvers, struct dns_addr_key, u32, 4096);
BPF_TABLE("lru_hash", struct dns_addr_key, struct enf_learned_val, enf_learned, ENF_LEARNED_MAX);
BPF_HASH(enf_unix, struct enf_unix_key, u32, ENF_UNIX_MAX);
BPF_PERCPU_ARRAY(enf_denied, u64, ENF_KINDS);

static __always_inline void enf_count(u32 kind)
{
	u64 *v = enf_denied.lookup(&kind);

	if (v)
		(*v)++;
}

/* Whether rules allow `port` under the sandbox's port ranges. */
static __always_inline bool enf_port_allowed(const struct enf_sandbox *cfg, u64 rules, u16 port)
{
	if (rules & cfg->any_port)
		return true;
#pragma clang loop unroll(disable)
	for (u32 i = 0; i < ENF_RANGES_MAX; i++) {
		if (i >= cfg->nranges)
			break;
		if ((rules & cfg->ranges[i].rules) && port >= cfg->ranges[i].first &&
		    port <= cfg->ranges[i].last)
			return true;
	}
	return false;
}

/* The verdict on a destination of sandbox `sb`: -1 when allowed, else the enf_kind of the
 * denial (`send`: a datagram without connect). `addr` is 16 bytes, an IPv4 address in its
 * first 4. An IPv4-mapped IPv6 address is judged as the IPv4 address it is. */
static __always_inline int enf_verdict(u32 sb, u16 family, const u8 *addr, u16 port, bool send)
{
	struct enf_sandbox *cfg = enf_sandboxes.lookup(&sb);
	struct enf_net_key nk = {};
	struct dns_addr_key dk = {};
	struct enf_learned_val *learned;
	u64 rules = 0, *net;
	bool v4 = family == AF_INET, mapped = false;
	u32 w0 = 0, w1 = 0, w2 = 0, w3 = 0;

	if (!cfg || !(cfg->flags & ENF_F_ON))
		return -1;
	if (family == AF_INET6) {
		/* words, not bytes: a branch per byte would multiply the verifier's paths */
		__builtin_memcpy(&w0, addr, 4);
		__builtin_memcpy(&w1, addr + 4, 4);
		__builtin_memcpy(&w2, addr + 8, 4);
		__builtin_memcpy(&w3, addr + 12, 4);
		mapped = w0 == 0 && w1 == 0 && w2 == bpf_htonl(0xffff);
		v4 = mapped;
	}
	if (v4) {
		const u8 *a4 = mapped ? addr + 12 : addr;

		__builtin_memcpy(dk.addr, a4, 4);
		dk.family = AF_INET;
		nk.addr[10] = 0xff;
		nk.addr[11] = 0xff;
		__builtin_memcpy(nk.addr + 12, a4, 4);
		if ((cfg->flags & ENF_F_LOOPBACK) && a4[0] == 127)
			return -1;
	} else {
		__builtin_memcpy(dk.addr, addr, 16);
		__builtin_memcpy(nk.addr, addr, 16);
		dk.family = AF_INET6;
		if ((cfg->flags & ENF_F_LOOPBACK) && (w0 | w1 | w2) == 0 && w3 == bpf_htonl(1))
			return -1;
	}
	dk.sandbox = sb;
	if (port == ENF_DNS_PORT) /* DNS goes to the sandbox's resolvers only */
		return enf_resolvers.lookup(&dk) ? -1 : ENF_DENIED_RESOLVER;
	nk.prefixlen = 32 + 128;
	nk.sandbox = sb;
	net = enf_nets.lookup(&nk);
	if (net)
		rules |= *net;
	learned = enf_learned.lookup(&dk);
	if (learned && bpf_ktime_get_ns() < learned->expires_ns)
		rules |= learned->rules;
	if (rules && enf_port_allowed(cfg, rules, port))
		return -1;
	return send ? ENF_DENIED_SEND : ENF_DENIED_CONNECT;
}

/* An answer from one of sandbox sb's resolvers: whether it may teach allow entries, and the
 * sandbox's policy when it may. */
static __always_inline struct enf_sandbox *enf_teacher(u32 sb, u16 family, const u8 *server)
{
	struct enf_sandbox *cfg = enf_sandboxes.lookup(&sb);
	struct dns_addr_key dk = {};

	if (!cfg || !(cfg->flags & ENF_F_ON))
		return NULL;
	dk.sandbox = sb;
	dk.family = family;
	__builtin_memcpy(dk.addr, server, 16);
	if (!enf_resolvers.lookup(&dk))
		return NULL;
	return cfg;
}

/* The rules naming a name (exact) or a domain strictly above it (wildcard), by hash. */
static __always_inline u64 enf_name_rules(u32 sb, u64 hash, u32 kind)
{
	struct enf_name_key k = { .hash = hash, .sandbox = sb, .kind = kind };
	u64 *rules = enf_names.lookup(&k);

	return rules ? *rules : 0;
}

/* Allow key's address for its sandbox's `rules` until now + max(ttl, the sandbox's floor),
 * keeping what an earlier answer allowed it for and until. */
static __always_inline void enf_learn(struct dns_addr_key *key, u64 rules, u64 now, u32 ttl)
{
	struct enf_learned_val val = {}, *old;
	u64 life = (u64)ttl * 1000000000ULL;
	u32 sb = key->sandbox;
	struct enf_sandbox *cfg = enf_sandboxes.lookup(&sb);

	if (!cfg)
		return;
	if (life < cfg->floor_ns)
		life = cfg->floor_ns;
	val.expires_ns = now + life;
	val.rules = rules;
	old = enf_learned.lookup(key);
	if (old && now < old->expires_ns) {
		val.rules |= old->rules;
		if (old->expires_ns > val.expires_ns)
			val.expires_ns = old->expires_ns;
	}
	if (enf_learned.update(key, &val) != 0)
		count_error(ERR_STASH_MAP_FULL);
}

/* Whether a unix connect of sandbox sb to `path` (as the caller gave it, `size` bytes; an
 * abstract name starts with NUL) names a socket no sandbox may reach: its file name, the
 * part after the last '/', is one of enf_unix. The hook runs before the path is looked up, so
 * a relative path, `..` or a doubled '/' change nothing; a symbolic link to the socket does
 * (README, Enforcement). */
static __always_inline bool enf_unix_denied(s32 sb, const char *path, u32 size)
{
	u32 sbu = sb, end = size < UNIX_PATH_MAX ? size : UNIX_PATH_MAX;
	struct enf_sandbox *cfg = enf_sandboxes.lookup(&sbu);
	struct enf_unix_key key = { .hash = FNV64_OFFSET_ENF };

	if (!cfg || !(cfg->flags & ENF_F_ON) || end == 0 || path[0] == 0)
		return false;
		/* the hash starts again after each '/': what is left is the file name's */
#pragma clang loop unroll(disable)
	for (u32 i = 0; i < UNIX_PATH_MAX; i++) {
		u8 c = path[i];

		if (i >= end || c == 0)
			break;
		if (c == '/')
			key.hash = FNV64_OFFSET_ENF;
		else
			key.hash = (key.hash ^ c) * FNV64_PRIME_ENF;
	}
	return enf_unix.lookup(&key) != NULL;
}

/* The sandbox whose cgroup subtree holds the socket of a packet (the socket's cgroup is
 * where it was made), or -1. */
static __always_inline s32 enf_sandbox_of_skb(struct __sk_buff *skb)
{
	s32 found = -1;

	/* a loop, not unrolled: every way out of it reaches the verdict as one state */
#pragma clang loop unroll(disable)
	for (int level = 1; level <= 16; level++) {
		u64 id = bpf_skb_ancestor_cgroup_id(skb, level);
		u32 *sb;

		if (!id)
			break;
		sb = sandbox_cgroups.lookup(&id);
		if (sb) {
			found = *sb;
			break;
		}
	}
	return found;
}

#endif /* HAVE_ENFORCE */

#endif /* SANDTRACE_ENFORCE_H */
