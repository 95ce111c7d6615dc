"""The service's batch decoder against 100,000 mutated and random inputs: it returns a batch
or raises BadBatch, and nothing else (no crash, no other exception)."""

from __future__ import annotations

import random

from detect.testing import event_from_fields
from service.wire import BadBatch, decode_batch, encode_batch

ROUNDS = 100_000


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.4 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.6 and b:
            del b[rng.randrange(len(b)) :]
        elif op < 0.8:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        else:
            b += rng.randbytes(rng.randint(1, 16))
    return bytes(b)


def test_decoder_survives_mutations_and_noise() -> None:
    rng = random.Random(20261127)
    seeds = [
        encode_batch("c", 1, [event_from_fields("process_creation", {"CommandLine": "a b"})]),
        encode_batch("c", 2, [event_from_fields("network_connection", {"DestinationPort": 22})]),
        encode_batch("c", 3, []),
    ]
    decoded = rejected = 0
    for i in range(ROUNDS):
        data = rng.randbytes(rng.randint(0, 64)) if i % 10 == 0 else mutate(rng, rng.choice(seeds))
        try:
            decode_batch(data)
            decoded += 1
        except BadBatch:
            rejected += 1
    assert decoded + rejected == ROUNDS
    assert rejected > ROUNDS // 2  # the mutations really broke most inputs
