"""A packet socket's record (the raw socket's, family AF_PACKET) becomes a raw-socket event
with family packet and its ethertype's name, and the pack's raw-socket rule rates it."""

from __future__ import annotations

from api.events import RawSocketEvent
from collector import records as R
from collector.assemble import Assembler, Scope, socket_protocol_name
from detect.engine import Engine
from detect.loader import load_paths
from tests.unit.test_assemble import pack
from tests.unit.test_rule_pack import RULES

RAW_SOCKET_RULE = "b3821069-e59d-446b-97ac-d28742dfd0ab"


def test_ethertype_names() -> None:
    assert socket_protocol_name(17, 0x0003) == "all"
    assert socket_protocol_name(17, 0x0806) == "arp"
    assert socket_protocol_name(17, 0) == "none"
    assert socket_protocol_name(17, 0x88CC) == "eth/0x88cc"  # LLDP
    assert socket_protocol_name(2, 1) == "icmp"  # an IP raw socket's protocol as before


def test_a_packet_socket_record_is_a_raw_socket_event_that_alerts() -> None:
    asm = Assembler([Scope("box", ["/"])], lambda _id: "/box", lambda _p: "", host="h")
    events, errors = asm.feed_batches(
        [[pack(R.REC_SOCK_CREATE, family=17, sock_type=3, protocol=0x0003)]]
    )
    assert errors == []
    [event] = events
    assert isinstance(event, RawSocketEvent)
    assert (event.family, event.protocol, event.protocol_number) == ("packet", "all", 3)
    alerts = Engine(load_paths([RULES])).feed(event)
    assert [a.rule_id for a in alerts] == [RAW_SOCKET_RULE]
