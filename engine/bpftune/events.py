"""The event record BPF programs send over the shared ring buffer (bpf/bpftune.bpf.h)."""

from __future__ import annotations

import ctypes as ct

MAX_VALUES = 3
STR_LEN = 128
#: An event's tuner_id: the tuner's index in the low TUNER_BITS bits; above them, the
#: generation of the tuner's BPF programs (a strategy switch loads new ones), so what
#: programs since unloaded sent is never taken for what their successors send.
TUNER_BITS = 16
GENERATIONS = 1 << 16


def event_tuner_id(index: int, generation: int) -> int:
    """The TUNER_ID a tuner's BPF programs of ``generation`` are compiled with."""
    return index | (generation % GENERATIONS) << TUNER_BITS


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

    @property
    def tuner_index(self) -> int:
        return self.tuner_id & ((1 << TUNER_BITS) - 1)

    @property
    def generation(self) -> int:
        return self.tuner_id >> TUNER_BITS

    def old_values(self, n: int) -> tuple[int, ...]:
        return tuple(self.old[:n])

    def new_values(self, n: int) -> tuple[int, ...]:
        return tuple(self.new[:n])

    def payload(self, layout: type[ct.Structure]) -> ct.Structure:
        """The tuner's own record in the event's ``str`` area, as ``layout`` (a ctypes
        struct the compile checked against the C one: see ``payload_checks``)."""
        size = ct.sizeof(layout)
        return layout.from_buffer_copy(ct.string_at(ct.addressof(self) + Event.str.offset, size))

    @property
    def text(self) -> str:
        return self.str.decode(errors="replace")

    @property
    def command(self) -> str:
        return self.comm.decode(errors="replace")


def payload_checks(layout: type[ct.Structure], c_struct: str) -> str:
    """C static assertions that ``struct <c_struct>`` has ctypes ``layout``'s size and field
    offsets and fits an event's payload area: appended to the tuner's source, so a mismatch
    fails the compile (at load, and in the portability tests) instead of garbling events."""
    checks = [f"_Static_assert(sizeof(struct {c_struct}) == {ct.sizeof(layout)}, "
              f'"struct {c_struct} is not the size of {layout.__name__}");',
              f"_Static_assert(sizeof(struct {c_struct}) <= {STR_LEN}, "
              f'"struct {c_struct} does not fit an event");']
    for name, *_ in layout._fields_:
        offset = getattr(layout, name).offset
        checks.append(f"_Static_assert(__builtin_offsetof(struct {c_struct}, {name}) == "
                      f'{offset}, "{c_struct}.{name} is not at {offset} as in '
                      f'{layout.__name__}");')
    return "\n".join(checks) + "\n"
