"""A tuner's own event record (payload): declared once as a ctypes struct, checked against
the C struct when the program compiles, and read back from real events."""

from __future__ import annotations

import ctypes as ct
import os
import socket

import pytest

from bpftune.bpf import BpfError, Programs, bpf_dir
from bpftune.btf import Btf
from bpftune.events import payload_checks
from bpftune.learning import LearningRate


class Neigh(ct.Structure):
    _fields_ = [("ifindex", ct.c_int32), ("family", ct.c_uint8), ("dev", ct.c_char * 16)]


SOURCE = """#include "bpftune.bpf.h"
struct neigh_payload {
	int ifindex;
	%s family;
	char dev[16];
};

RAW_TRACEPOINT_PROBE(sock_send_length)	/* one event for this test's own send */
{
	struct bpftune_event ev = {};
	struct neigh_payload *p = (void *)ev.str;

	if ((bpf_get_current_pid_tgid() >> 32) != TEST_PID)
		return 0;
	p->ifindex = 7;
	p->family = 10;
	__builtin_memcpy(p->dev, "veth-test", 10);
	submit_event(&ev);
	return 0;
}
"""


@pytest.fixture(scope="module")
def programs():
    received = []
    p = Programs(Btf.load(), LearningRate(), received.append)
    yield p, received
    p.close()


def compile_with(programs: Programs, family_type: str):
    return programs.compile(bpf_dir() / "payload_test.bpf.c", 0, {},
                            text=SOURCE % family_type, defines=[f"-DTEST_PID={os.getpid()}"],
                            checks=payload_checks(Neigh, "neigh_payload"))


def test_a_payload_sent_from_bpf_reads_back_as_its_ctypes_layout(programs):
    p, received = programs
    bpf = compile_with(p, "u8")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", ("127.0.0.1", 9))
        p.poll(1000)
    finally:
        bpf.close()
    payload = received[-1].payload(Neigh)
    assert (payload.ifindex, payload.family, payload.dev) == (7, 10, b"veth-test")


def test_a_c_struct_that_differs_from_its_ctypes_layout_does_not_compile(programs):
    p, _ = programs
    with pytest.raises(BpfError):  # family is a u16 in C: dev moves, and the size grows
        compile_with(p, "u16").close()
