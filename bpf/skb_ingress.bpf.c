/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Packets a sandbox receives, from a cgroup_skb ingress program on the traced cgroups only
 * (cgroups without a program skip the hook almost for free): each socket's first bytes in,
 * classified, and every DNS answer, whose addresses enter dns_names before the answer reaches
 * the process (flows.h). It never drops a packet.
 */

#include "events.h"
#include "flows.h"

#ifdef HAVE_FLOWS

int skb_ingress(struct __sk_buff *skb)
{
	if (skb->sk)
		flow_packet(skb, true);
	return 1;
}

/* A DNS answer's parse, in stages entered by tail call from skb_ingress (flows.h, dns_stages). */
int dns_question(struct __sk_buff *skb)
{
	return dns_stage(skb, DNS_STAGE_QUESTION);
}

int dns_name(struct __sk_buff *skb)
{
	return dns_stage(skb, DNS_STAGE_NAME);
}

int dns_answers(struct __sk_buff *skb)
{
	return dns_stage(skb, DNS_STAGE_ANSWERS);
}

#endif /* HAVE_FLOWS */
