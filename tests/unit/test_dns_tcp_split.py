"""A DNS answer over TCP split across segments: the kernel sends the segment that starts the
message with the message's length (its TCP length prefix) as payload_full; the collector
says that the answers past the segment were not read (nor learnt in the kernel), and the run
summary counts such answers. A message cut only by the 512-byte capture, or over UDP, is
truncated but not split."""

from __future__ import annotations

from api.events import DnsEvent
from collector import dns
from collector import records as R
from collector.summary import RunSummary
from tests.unit.test_names_protocols import CHAIN, assembler, feed, record

TCP, UDP = 6, 17


def dns_record(
    msg: bytes, protocol: int = UDP, payload_size: int = -1, payload_full: int = -1
) -> bytes:
    """A dns_record as the kernel sends it: `msg` captured of a message of payload_full."""
    return record(
        R.DnsRecord,
        server=bytes([192, 0, 2, 53]) + bytes(12),
        family=2,
        server_port=53,
        protocol=protocol,
        payload_size=len(msg) if payload_size < 0 else payload_size,
        payload_full=len(msg) if payload_full < 0 else payload_full,
        payload=msg,
    )


def one(buf: bytes) -> DnsEvent:
    [ev] = feed(assembler(), buf)
    assert isinstance(ev, DnsEvent)
    return ev


def test_a_tcp_message_longer_than_its_segment_is_said_split() -> None:
    first = CHAIN[:60]  # the header, the question and part of the answers
    ev = one(dns_record(first, protocol=TCP, payload_size=len(first), payload_full=len(CHAIN)))
    assert ev.protocol == "tcp" and ev.truncated
    assert ev.error == dns.split_error(60, len(CHAIN))
    assert ev.error.startswith(dns.SPLIT)
    assert ev.query_name == "pool.example.test"  # what the segment holds is still read


def test_a_split_header_is_said_split_not_malformed() -> None:
    ev = one(dns_record(CHAIN[:8], protocol=TCP, payload_size=8, payload_full=len(CHAIN)))
    assert ev.error == dns.split_error(8, len(CHAIN))


def test_whole_or_capture_cut_or_udp_messages_are_not_split() -> None:
    whole = one(dns_record(CHAIN, protocol=TCP))
    assert (whole.truncated, whole.error) == (False, "")
    assert whole.addresses == ["198.51.100.7", "2001:db8::7"]
    big = CHAIN + bytes(R.DNS_PAYLOAD_MAX)  # longer than the capture: cut there, not split
    cut = one(
        dns_record(
            big[: R.DNS_PAYLOAD_MAX],
            protocol=TCP,
            payload_size=R.DNS_PAYLOAD_MAX,
            payload_full=len(big),
        )
    )
    assert cut.truncated and not cut.error.startswith(dns.SPLIT)
    udp = one(dns_record(CHAIN[:60], payload_size=60, payload_full=len(CHAIN)))
    assert udp.truncated and not udp.error.startswith(dns.SPLIT)


def test_the_summary_counts_split_answers() -> None:
    summary = RunSummary()
    summary.emit(one(dns_record(CHAIN, protocol=TCP)))
    assert summary.as_dict()["dns_answers_split"] == 0
    assert not [line for line in summary.lines() if "dns:" in line]
    for _ in range(2):
        summary.emit(
            one(dns_record(CHAIN[:60], protocol=TCP, payload_size=60, payload_full=len(CHAIN)))
        )
    assert summary.as_dict()["dns_answers_split"] == 2
    assert (
        "  dns: 2 answers over TCP split across segments (the addresses past the first "
        "segment were not learnt)"
    ) in summary.lines()
