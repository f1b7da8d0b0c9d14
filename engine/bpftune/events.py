"""The event record BPF programs send over the shared ring buffer (bpf/bpftune.bpf.h)."""

from __future__ import annotations

import ctypes as ct

MAX_VALUES = 3
STR_LEN = 128


class Event(ct.Structure):
    _fields_ = [
        ("tuner_id", ct.c_uint32),
        ("scenario_id", ct.c_uint32),
        ("netns_cookie", ct.c_uint64),
        ("pid", ct.c_int32),
        ("tunable_id", ct.c_uint32),
        ("old", ct.c_int64 * MAX_VALUES),
        ("new", ct.c_int64 * MAX_VALUES),
        ("metric", ct.c_int64 * 2),
        ("comm", ct.c_char * 16),
        ("str", ct.c_char * STR_LEN),
    ]

    @classmethod
    def from_buffer_address(cls, data: int, size: int) -> Event | None:
        if size < ct.sizeof(cls):
            return None
        return cls.from_buffer_copy(ct.string_at(data, ct.sizeof(cls)))

    def old_values(self, n: int) -> tuple[int, ...]:
        return tuple(self.old[:n])

    def new_values(self, n: int) -> tuple[int, ...]:
        return tuple(self.new[:n])

    @property
    def text(self) -> str:
        return self.str.decode(errors="replace")

    @property
    def command(self) -> str:
        return self.comm.decode(errors="replace")
