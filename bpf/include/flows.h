/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Names and protocols of a sandbox's flows, from its own packets (cgroup_skb programs on the
 * sandbox cgroups: skb_egress.bpf.c, skb_ingress.bpf.c), so that the rest of the host pays
 * nothing for them:
 *   - the first packet with payload in each direction of a socket a traced process made is
 *     classified by its first bytes (SSH, TLS, HTTP, Stratum, DNS) and sent with up to
 *     FLOW_PAYLOAD_MAX bytes of it (one flow_record per socket and direction);
 *   - every DNS answer from port 53 to such a socket is parsed here far enough to enter its
 *     A and AAAA answers in dns_names, (sandbox, address) -> (name hash, expiry), before the
 *     answer reaches the process, and sent whole (up to DNS_PAYLOAD_MAX) as a dns_record for
 *     user space to parse (names, CNAME chains, rcode).
 * Packets carry no process context: the process is the socket's maker (sock_owner).
 * Everything in a packet is untrusted: every loop is bounded, every read masked.
 */
#ifndef SANDTRACE_FLOWS_H
#define SANDTRACE_FLOWS_H

#include "events.h"
#include "inet.h"
#include "counters.h"
#include "output.h"
#include "sock_stash.h"
#include "enforce.h"

#ifdef HAVE_FLOWS

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#ifndef IPPROTO_UDP
#define IPPROTO_UDP 17
#endif
#define DNS_PORT 53

#define DNS_NAMES_MAX 65536
#define DNS_ANSWERS_MAX 16 /* answers of one message looked at */
#define DNS_LABELS_MAX 64 /* labels of one owner name skipped */
#define DNS_NAME_MAX 255 /* bytes of a name in wire form */
#define DNS_MASK (DNS_PAYLOAD_MAX - 1)
#define FNV64_OFFSET 0xcbf29ce484222325ULL
#define FNV64_PRIME 0x100000001b3ULL

/* The name it resolved it as: the hash of the question name (dns_name_hash: FNV-1a 64 over
 * its labels from the last to the first), as collector/dns.py name_hash() computes it; when
 * the answer stops holding. */
struct dns_addr_val {
	u64 name_hash;
	u64 expires_ns; /* bpf_ktime_get_ns() clock */
	u32 ttl;
	u32 _pad0;
};

BPF_TABLE("lru_hash", struct dns_addr_key, struct dns_addr_val, dns_names, DNS_NAMES_MAX);

/* Scratch: a record is built here, not on the 512-byte stack; `cursor` launders a DNS read
 * position through memory so that the verifier forgets where exactly it is (every read is
 * masked), and paths through the parse that differ only there are checked once. */
struct flow_scratch {
	union {
		struct flow_record flow;
		struct dns_record dns;
	};
	u32 cursor;
	u32 _pad0;
	u64 label_hash[DNS_LABELS_MAX]; /* of the question name's labels (dns_name_hash) */
	/* enforcement: whether this answer may teach allow entries, and the rules naming its
	 * question; kept here, not in registers, so that the verifier checks what follows once */
	u64 rules;
	u64 name_hash; /* of the question name (dns_name_hash) */
	u32 teach;
	u32 nlab; /* labels of the question name */
	u32 answers_off; /* where the answer section starts */
	u32 ancount;
};

BPF_PERCPU_ARRAY(flow_scratch_map, struct flow_scratch, 1);

/* Where a packet's payload is, and its endpoints as the socket sees them. */
struct packet_info {
	u8 laddr[16];
	u8 raddr[16];
	u16 family;
	u16 lport;
	u16 rport;
	u16 protocol;
	u32 payload_off;
	u32 payload_len;
};

/* Read the IP and TCP/UDP headers (the packet starts at the network header in cgroup_skb);
 * false for anything else. IPv6 extension headers are not followed. */
static __always_inline bool packet_info(struct __sk_buff *skb, bool ingress, struct packet_info *p)
{
	u8 first = 0, next = 0, doff = 0;
	u16 ports[2] = {};
	u32 l4, alen, src, dst;

	if (bpf_skb_load_bytes(skb, 0, &first, 1))
		return false;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 9, &next, 1))
			return false;
		l4 = (first & 0x0f) * 4;
		src = 12;
		dst = 16;
		alen = 4;
		p->family = AF_INET;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 6, &next, 1))
			return false;
		l4 = 40;
		src = 8;
		dst = 24;
		alen = 16;
		p->family = AF_INET6;
	} else {
		return false;
	}
	if (next != IPPROTO_TCP && next != IPPROTO_UDP)
		return false;
	if (alen == 4) {
		if (bpf_skb_load_bytes(skb, ingress ? dst : src, p->laddr, 4) ||
		    bpf_skb_load_bytes(skb, ingress ? src : dst, p->raddr, 4))
			return false;
	} else {
		if (bpf_skb_load_bytes(skb, ingress ? dst : src, p->laddr, 16) ||
		    bpf_skb_load_bytes(skb, ingress ? src : dst, p->raddr, 16))
			return false;
	}
	if (bpf_skb_load_bytes(skb, l4, ports, 4))
		return false;
	p->lport = bpf_ntohs(ingress ? ports[1] : ports[0]);
	p->rport = bpf_ntohs(ingress ? ports[0] : ports[1]);
	p->protocol = next;
	if (next == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, l4 + 12, &doff, 1))
			return false;
		p->payload_off = l4 + (doff >> 4) * 4;
	} else {
		p->payload_off = l4 + 8;
	}
	if (skb->len <= p->payload_off)
		return false;
	p->payload_len = skb->len - p->payload_off;
	return true;
}

/* Copy up to `max` (a power of two) bytes of payload to `dst`; how many were copied. */
static __always_inline u32 load_payload(struct __sk_buff *skb, u32 off, u32 len, u8 *dst, u32 max)
{
	u64 n = len < max ? len : max;

	/* the verifier wants a size it can bound, 1..max, in the register passed: a mask the
	 * compiler cannot drop */
	asm volatile("" : "+r"(n));
	n &= (max << 1) - 1;
	if (n == 0 || n > max)
		return 0;
	if (bpf_skb_load_bytes(skb, off, dst, n))
		return 0;
	return n;
}

static __always_inline bool starts(const u8 *p, u32 size, const char *lit, u32 n)
{
	if (size < n)
		return false;
#pragma unroll
	for (u32 i = 0; i < n; i++)
		if (p[i] != (u8)lit[i])
			return false;
	return true;
}

#define STARTS(p, size, lit) starts(p, size, lit, sizeof(lit) - 1)

/* Stratum: a JSON-RPC object naming a mining method within the first FLOW_PAYLOAD_MAX bytes:
 * "login" (the pool protocol of xmrig and its kin), "mining.subscribe", "mining.authorize"
 * (the Bitcoin-family protocol; both start "mining.). */
static __always_inline bool stratum_method(const u8 *p, u32 size)
{
	const u64 mining = 0x2e676e696e696d22ULL; /* "\"mining." little-endian */
	const u64 login = 0x226e69676f6c22ULL; /* "\"login\"" in 7 bytes */

	if (size < 16 || p[0] != '{')
		return false;
#pragma clang loop unroll(disable)
	for (u32 i = 1; i < FLOW_PAYLOAD_MAX - 8; i++) {
		u64 w = 0;

		if (i + 8 > size)
			break;
		__builtin_memcpy(&w, p + i, 8);
		if (w == mining || (w & 0x00ffffffffffffffULL) == login)
			return true;
	}
	return false;
}

/* What a flow speaks, from its first payload bytes in one direction. */
static __always_inline u32 classify(const u8 *p, u32 size, struct packet_info *pi, bool ingress)
{
	if (STARTS(p, size, "SSH-2.0-") || STARTS(p, size, "SSH-1.99-"))
		return APP_SSH;
	/* handshake record, TLS 1.x, ClientHello (1) out or ServerHello (2) in */
	if (size >= 6 && p[0] == 0x16 && p[1] == 0x03 && p[5] == (ingress ? 2 : 1))
		return APP_TLS;
	if (!ingress &&
	    (STARTS(p, size, "GET ") || STARTS(p, size, "POST ") || STARTS(p, size, "HEAD ") ||
	     STARTS(p, size, "PUT ") || STARTS(p, size, "DELETE ") || STARTS(p, size, "OPTIONS ") ||
	     STARTS(p, size, "PATCH ") || STARTS(p, size, "CONNECT ")))
		return APP_HTTP;
	if (ingress && STARTS(p, size, "HTTP/1."))
		return APP_HTTP;
	if (stratum_method(p, size))
		return APP_STRATUM;
	if (pi->rport == DNS_PORT)
		return APP_DNS;
	return APP_UNKNOWN;
}

/* Send the first payload of one direction of a sandbox socket's flow, classified. */
static __always_inline void flow_first(struct __sk_buff *skb, struct sock_owner *owner, u64 cookie,
				       struct packet_info *pi, bool ingress)
{
	u32 zero = 0;
	struct flow_scratch *s = flow_scratch_map.lookup(&zero);
	struct flow_record *r;
	u32 n;

	if (!s)
		return;
	r = &s->flow;
	__builtin_memset(r, 0, sizeof(*r));
	n = load_payload(skb, pi->payload_off, pi->payload_len, r->payload, FLOW_PAYLOAD_MAX);
	if (n == 0)
		return;
	r->hdr = owner->hdr;
	r->hdr.type = REC_FLOW;
	r->hdr.size = sizeof(*r);
	r->hdr.ktime_ns = bpf_ktime_get_ns();
	r->cookie = cookie;
	__builtin_memcpy(r->laddr, pi->laddr, 16);
	__builtin_memcpy(r->raddr, pi->raddr, 16);
	r->family = pi->family;
	r->lport = pi->lport;
	r->rport = pi->rport;
	r->protocol = pi->protocol;
	r->flags = ingress ? FLOW_F_INGRESS : 0;
	r->payload_size = n;
	r->payload_full = pi->payload_len;
	r->app = classify(r->payload, n, pi, ingress);
	emit_priority(skb, r, sizeof(*r), REC_FLOW);
}

/* A position in a DNS message, forgotten by the verifier (see flow_scratch) and masked. */
static __always_inline u32 launder(struct flow_scratch *s, u32 off)
{
	volatile u32 *cursor = &s->cursor; /* a store and a load the compiler keeps */

	*cursor = off;
	return *cursor & DNS_MASK;
}

static __always_inline u16 dns_u16(const u8 *m, u32 off)
{
	return (u16)m[off & DNS_MASK] << 8 | m[(off + 1) & DNS_MASK];
}

/* The hash of a name (dns_name_hash): each label hashed alone, FNV-1a 64 over its length
 * byte and its bytes, ASCII lowered (s->label_hash, by dns_walk_question); then the labels'
 * hashes folded from the last to the first, h = (h ^ label) * FNV64_PRIME. Folded from the
 * right, the hash of every domain above the name is a step on the way to the name's own: a
 * wildcard's lookup costs one more lookup, not another walk. Looks the sandbox's allowed
 * names up as it goes (when s->teach): the rules naming it, into s->rules. */
static __always_inline void dns_name_hash(struct flow_scratch *s)
{
	volatile u32 *count = &s->nlab; /* read each step: no trip count for the compiler */
	u32 sb = s->dns.hdr.sandbox;
	u64 h = FNV64_OFFSET;

#pragma clang loop unroll(disable)
	for (u32 k = 0; k < DNS_LABELS_MAX; k++) {
		u32 n = *count;

		if (k >= n)
			break;
		h = (h ^ s->label_hash[(n - 1 - k) & (DNS_LABELS_MAX - 1)]) * FNV64_PRIME;
#ifdef HAVE_ENFORCE
		/* a domain strictly above the name */
		if (s->teach && k + 1 < n)
			s->rules |= enf_name_rules(sb, h, ENF_NAME_WILDCARD);
#endif
	}
#ifdef HAVE_ENFORCE
	if (s->teach)
		s->rules |= enf_name_rules(sb, h, ENF_NAME_EXACT);
#endif
	s->name_hash = h;
}

/* The header and question of the DNS message in the scratch record: whether it is a response
 * worth parsing (no error, one question), the hash of each label of its question name, where
 * its answers start. */
static __always_inline bool dns_walk_question(struct flow_scratch *s)
{
	const u8 *m = s->dns.payload;
	u32 size = s->dns.payload_size, lab = 0, i, nlab = 0;
	u64 h = FNV64_OFFSET;

	if (size < 12 || size > DNS_PAYLOAD_MAX)
		return false;
	/* QR set, opcode 0, rcode 0; one question */
	if (!(m[2] & 0x80) || (m[2] & 0x78) || (m[3] & 0x0f) || dns_u16(m, 4) != 1)
		return false;
	s->ancount = dns_u16(m, 6);
#pragma clang loop unroll(disable)
	for (i = 0; i < DNS_NAME_MAX; i++) {
		u8 c = m[(12 + i) & DNS_MASK];

		if (12 + i >= size)
			return false;
		/* forgotten by the verifier each step (launder): one state a step, not one for
		 * every label length and count seen so far */
		lab = launder(s, lab);
		nlab = launder(s, nlab);
		if (lab == 0) {
			if (c == 0) {
				s->nlab = nlab;
				s->answers_off = 12 + i + 1 + 4; /* the root's 0, QTYPE, QCLASS */
				return true;
			}
			if (c > 63 || nlab >= DNS_LABELS_MAX)
				return false;
			nlab++;
			lab = c;
			h = FNV64_OFFSET;
		} else {
			lab--;
			if (c >= 'A' && c <= 'Z')
				c += 'a' - 'A';
		}
		h = (h ^ c) * FNV64_PRIME;
		s->label_hash[(nlab - 1) & (DNS_LABELS_MAX - 1)] = h;
	}
	return false;
}

/* Enter the A and AAAA answers of the DNS response in the scratch record in dns_names under
 * its question's name (s->name_hash); how many were entered. Owner names are skipped,
 * compression pointers and all; every address answer is the question's (as the resolver
 * library hands them to the process: the chain of CNAMEs ends at them), and user space
 * checks the chain when it parses the message. Under enforcement, an answer from one of the
 * sandbox's resolvers to a question its policy names (s->rules) also allows each address
 * (enf_learned), before the answer reaches the process. */
static __always_inline u32 dns_map_answers(struct flow_scratch *s)
{
	const u8 *m = s->dns.payload;
	struct dns_addr_key key = {};
	struct dns_addr_val val = {};
	u32 size = s->dns.payload_size, off, mapped = 0, ancount = s->ancount;
	u64 now;
	bool ended;

	if (size > DNS_PAYLOAD_MAX)
		return 0;
	off = launder(s, s->answers_off);
	key.sandbox = s->dns.hdr.sandbox;
	val.name_hash = s->name_hash;
	now = bpf_ktime_get_ns();
#pragma clang loop unroll(disable)
	for (u32 a = 0; a < DNS_ANSWERS_MAX; a++) {
		u16 type, rdlen;
		u32 ttl;

		if (a >= ancount)
			break;
		ended = false;
#pragma clang loop unroll(disable)
		for (u32 l = 0; l < DNS_LABELS_MAX; l++) {
			u8 c = m[off & DNS_MASK];

			if (off >= size)
				return mapped;
			if (c == 0) {
				off += 1;
				ended = true;
				break;
			}
			if ((c & 0xc0) == 0xc0) {
				off += 2;
				ended = true;
				break;
			}
			if (c > 63)
				return mapped;
			off = launder(s, off + c + 1);
		}
		if (!ended || off + 10 > size)
			return mapped;
		off = launder(s, off);
		type = dns_u16(m, off);
		ttl = (u32)dns_u16(m, off + 4) << 16 | dns_u16(m, off + 6);
		rdlen = dns_u16(m, off + 8);
		off += 10;
		if (off + rdlen > size)
			return mapped;
		if ((type == 1 && rdlen == 4) || (type == 28 && rdlen == 16)) {
			__builtin_memset(key.addr, 0, sizeof(key.addr));
#pragma unroll
			for (u32 k = 0; k < 16; k++)
				if (k < rdlen)
					key.addr[k] = m[(off + k) & DNS_MASK];
			key.family = type == 1 ? AF_INET : AF_INET6;
			val.ttl = ttl;
			val.expires_ns = now + (u64)ttl * 1000000000ULL;
			if (dns_names.update(&key, &val) == 0)
				mapped++;
			else
				count_error(ERR_STASH_MAP_FULL);
#ifdef HAVE_ENFORCE
			if (s->rules)
				enf_learn(&key, s->rules, now, ttl);
#endif
		}
		off = launder(s, off + rdlen);
	}
	return mapped;
}

/* The programs that parse a DNS answer (skb_ingress.bpf.c), one after the other by tail
 * call: DNS_STAGE_QUESTION (dns_walk_question), DNS_STAGE_NAME (dns_name_hash),
 * DNS_STAGE_ANSWERS (dns_map_answers, and the record sent). Each is verified on its own, so
 * that the many ways through one part do not each take the verifier through the rest again.
 * Filled by the loader. */
#define DNS_STAGE_QUESTION 0
#define DNS_STAGE_NAME 1
#define DNS_STAGE_ANSWERS 2
BPF_PROG_ARRAY(dns_stages, 3);

/* A DNS message from port 53 to a sandbox socket: into the scratch record, then through the
 * dns_stages (its answers into dns_names, the message to user space). Should a tail call fail
 * (the stages are gone: the collector that loaded them died, and the kernel empties a program
 * array when no process holds it), the message goes to user space unparsed (mapped 0) and
 * teaches nothing. */
static __always_inline void dns_answer(struct __sk_buff *skb, struct sock_owner *owner, u64 cookie,
				       struct packet_info *pi)
{
	u32 zero = 0, off = pi->payload_off, len = pi->payload_len, full, n;
	struct flow_scratch *s = flow_scratch_map.lookup(&zero);
	struct dns_record *r;
	u16 prefix = 0;

	if (!s)
		return;
	full = len;
	if (pi->protocol == IPPROTO_TCP) {
		/* a segment that starts a message: its 2-byte length first. The message's length
		 * is sent as payload_full: one longer than the segment continues in the next ones,
		 * which are not reassembled (user space reports it; its answers past this segment
		 * teach nothing). */
		if (len <= 2 || bpf_skb_load_bytes(skb, off, &prefix, 2))
			return;
		off += 2;
		len -= 2;
		full = bpf_ntohs(prefix);
		if (full < len) /* another message follows in the segment: this one only */
			len = full;
	}
	r = &s->dns;
	__builtin_memset(r, 0, sizeof(*r));
	n = load_payload(skb, off, len, r->payload, DNS_PAYLOAD_MAX);
	if (n == 0)
		return;
	r->hdr = owner->hdr;
	r->hdr.type = REC_DNS;
	r->hdr.size = sizeof(*r);
	r->hdr.ktime_ns = bpf_ktime_get_ns();
	r->cookie = cookie;
	__builtin_memcpy(r->server, pi->raddr, 16);
	r->family = pi->family;
	r->server_port = pi->rport;
	r->protocol = pi->protocol;
	r->payload_size = n;
	r->payload_full = full;
	dns_stages.call(skb, DNS_STAGE_QUESTION);
	emit_priority(skb, r, sizeof(*r), REC_DNS);
}

/* The stages of dns_answer (dns_stages), on the message in the scratch record: each ends in
 * the next, or sends the record. */
static __always_inline int dns_stage(struct __sk_buff *skb, u32 stage)
{
	u32 zero = 0;
	struct flow_scratch *s = flow_scratch_map.lookup(&zero);

	if (!s)
		return 1;
	if (stage == DNS_STAGE_QUESTION) {
		s->rules = 0;
		s->teach = 0;
		if (dns_walk_question(s)) {
#ifdef HAVE_ENFORCE
			s->teach = enf_teacher(s->dns.hdr.sandbox, s->dns.family, s->dns.server) !=
				   NULL;
#endif
			dns_stages.call(skb, DNS_STAGE_NAME);
		}
	} else if (stage == DNS_STAGE_NAME) {
		dns_name_hash(s);
		dns_stages.call(skb, DNS_STAGE_ANSWERS);
	} else {
		s->dns.mapped = dns_map_answers(s);
	}
	emit_priority(skb, &s->dns, sizeof(s->dns), REC_DNS);
	return 1;
}

/* Whether an incoming packet comes from port 53 (the cheap test, before packet_info). */
static __always_inline bool from_dns_port(struct __sk_buff *skb)
{
	u8 first = 0;
	u16 port = 0;
	u32 l4;

	if (bpf_skb_load_bytes(skb, 0, &first, 1))
		return false;
	l4 = skb->protocol == bpf_htons(ETH_P_IP) ? (first & 0x0f) * 4 : 40;
	if (bpf_skb_load_bytes(skb, l4, &port, 2))
		return false;
	return port == bpf_htons(DNS_PORT);
}

/* Every packet of a sandbox socket, either way: classify each direction's first payload, and
 * read every DNS answer. Never changes the packet's fate. */
static __always_inline void flow_packet(struct __sk_buff *skb, bool ingress)
{
	struct packet_info pi = {};
	struct sock_owner *owner;
	u64 cookie = bpf_get_socket_cookie(skb);
	u32 bit = ingress ? FLOW_DONE_IN : FLOW_DONE_OUT;
	bool dns;

	owner = sock_owner.lookup(&cookie);
	if (!owner)
		return;
	if (owner->flow_done & bit) {
		/* classified already: only DNS answers are still read */
		if (!ingress || !from_dns_port(skb))
			return;
	}
	if (!packet_info(skb, ingress, &pi))
		return;
	dns = ingress && pi.rport == DNS_PORT;
	if (!(owner->flow_done & bit)) {
		owner->flow_done |= bit;
		flow_first(skb, owner, cookie, &pi, ingress);
	}
	if (dns)
		dns_answer(skb, owner, cookie, &pi);
}

#endif /* HAVE_FLOWS */

#endif /* SANDTRACE_FLOWS_H */
