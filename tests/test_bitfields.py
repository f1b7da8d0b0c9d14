"""READ_FIELD reads real kernel bitfields, checked end to end on the running kernel.

BPF programs read kernel struct fields only at offsets resolved from BTF, and some of those
fields are bitfields on some kernels: ``sock.sk_userlocks`` is a 4-bit bitfield on Linux 6.1
(Debian 12's kernel) but a whole byte on this machine's 6.18, so the tuners' own fields
cannot exercise the bitfield path here. ``struct sock`` still has real 1-bit fields on every
kernel: ``sk_no_check_tx``, set by setsockopt(SOL_SOCKET, SO_NO_CHECK). A small BPF program
on the ``sock_send_length`` raw tracepoint reads it (and ``sk_userlocks``, a whole byte here)
with READ_FIELD for UDP sockets this test configures and sends from, and the values must be
what the setsockopt calls made them. So bitfield offsets, shifts and masks from
bpftune.btf, and READ_FIELD in bpftune.bpf.h, are proven on a live kernel struct, not only on
synthetic BTF (tests/test_units.py).
"""

from __future__ import annotations

import os
import socket

import pytest

from bpftune.bpf import Programs, bpf_dir
from bpftune.btf import Btf, BtfError, Field
from bpftune.learning import LearningRate

SO_NO_CHECK = 11  # asm-generic/socket.h; Python's socket module has no name for it
SOCK_SNDBUF_LOCK = 1  # include/net/sock.h: sk_userlocks bits
SOCK_RCVBUF_LOCK = 2

FIELDS = {
    "OFF_SK_NO_CHECK_TX": Field("sock.sk_no_check_tx", 1),
    "OFF_SK_USERLOCKS": Field("sock.sk_userlocks", 1),
}

# Keyed by the bytes sent, which each socket of the test makes different. `raw` is the
# whole byte that holds sk_no_check_tx, to show that READ_FIELD's shift and mask did work.
SOURCE = r"""
#include "bpftune.bpf.h"

struct seen {
	u8 no_check_tx;
	u8 raw;
	u8 userlocks;
};
BPF_HASH(seen_by_length, u32, struct seen, 64);

RAW_TRACEPOINT_PROBE(sock_send_length)	/* (sk, ret, flags), every sendmsg */
{
	void *sk = (void *)ctx->args[0];
	int sent = (int)ctx->args[1];
	u32 key = sent;
	struct seen s = {};

	if ((bpf_get_current_pid_tgid() >> 32) != TEST_PID || sent <= 0)
		return 0;
	READ_FIELD(s.no_check_tx, sk, SK_NO_CHECK_TX);
	READ_AT(s.raw, sk, OFF_SK_NO_CHECK_TX);
	READ_FIELD(s.userlocks, sk, SK_USERLOCKS);
	seen_by_length.update(&key, &s);
	return 0;
}
"""


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf.load()


@pytest.fixture
def seen(btf):
    """The map of what the BPF program saw, attached to sock_send_length for this process."""
    programs = Programs(btf, LearningRate(), lambda _event: None)
    try:
        compiled = programs.compile(bpf_dir() / "bitfield_test.bpf.c", 0, FIELDS, text=SOURCE,
                                    defines=[f"-DTEST_PID={os.getpid()}"])
        try:
            yield compiled[b"seen_by_length"]
        finally:
            compiled.close()
    finally:
        programs.close()


def udp_socket(*options: tuple[int, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option, value in options:
        s.setsockopt(socket.SOL_SOCKET, option, value)
    return s


def test_the_fields_are_a_bitfield_and_a_whole_byte_on_this_kernel(btf):
    no_check = btf.field(FIELDS["OFF_SK_NO_CHECK_TX"])
    assert no_check.bits == 1, f"sock.sk_no_check_tx is not a 1-bit field here: {no_check}"
    assert no_check.mask == 1, no_check
    # Not the first bit of its byte, so a READ_FIELD that failed to shift would read it wrong.
    assert no_check.shift != 0, f"sock.sk_no_check_tx is bit 0 of its byte: {no_check}"
    userlocks = btf.field(FIELDS["OFF_SK_USERLOCKS"])
    assert (userlocks.bits, userlocks.shift, userlocks.mask) == (0, 0, 0xFF), userlocks


def test_read_field_reads_a_kernel_bitfield_and_a_whole_field(btf, seen):
    where = btf.field(FIELDS["OFF_SK_NO_CHECK_TX"])
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    senders = {
        11: udp_socket((SO_NO_CHECK, 1), (socket.SO_RCVBUF, 65536)),
        22: udp_socket(),
        33: udp_socket((socket.SO_SNDBUF, 65536)),
    }
    try:
        receiver.bind(("127.0.0.1", 0))
        for length, sender in senders.items():
            assert sender.sendto(b"x" * length, receiver.getsockname()) == length
        # What the kernel says through getsockopt, for the program's reading to agree with.
        kernel = {length: s.getsockopt(socket.SOL_SOCKET, SO_NO_CHECK)
                  for length, s in senders.items()}
    finally:
        for s in (receiver, *senders.values()):
            s.close()

    got = {length: seen[seen.Key(length)] for length in senders}
    values = {length: (v.no_check_tx, v.userlocks, v.raw) for length, v in got.items()}
    context = f"sk_no_check_tx at {where}; (no_check_tx, userlocks, raw byte) by length: {values}"
    assert kernel == {11: 1, 22: 0, 33: 0}, context
    assert {length: v.no_check_tx for length, v in got.items()} == kernel, context
    assert {length: v.userlocks for length, v in got.items()} == {
        11: SOCK_RCVBUF_LOCK, 22: 0, 33: SOCK_SNDBUF_LOCK}, context
    for v in got.values():  # the bit in the byte it shares with other bitfields
        assert (v.raw >> where.shift) & 1 == v.no_check_tx, context
    assert got[11].raw != got[11].no_check_tx, f"the byte read needed no shift: {context}"


def test_a_real_bitfield_wider_than_the_bytes_read_is_an_error(btf):
    """No bitfield of struct sock straddles a byte; perf_event_attr.precise_ip (UAPI, so
    the same on every kernel: bits 15-16 of the flags word at offset 40) does."""
    with pytest.raises(BtfError, match="2-bit field at bit 7 of its byte"):
        btf.field(Field("perf_event_attr.precise_ip", 1))
    where = btf.field(Field("perf_event_attr.precise_ip", 2))
    assert (where.offset, where.size, where.shift, where.bits, where.mask) == (41, 2, 7, 2, 3)
