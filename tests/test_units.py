"""Pure logic: learning-rate steps, correlation, ceilings (through the change path, on
in-memory sysctls), BTF resolution, parsing."""

from __future__ import annotations

import ctypes as ct
from types import SimpleNamespace

import pytest
from test_tcp_buffer_logic import Kernel, fake_ram

from bpftune.btf import Btf, BtfError, Field, Location, offset_defines
from bpftune.changes import Changes, StateFile, ordered, within_ceiling
from bpftune.correlation import MIN_SAMPLES, Correlation
from bpftune.events import Event
from bpftune.hooks import PlanError, Watch, fentry, make_plan, raw_tp, tp
from bpftune.learning import LearningRate, LearningRateError
from bpftune.plugins import normalize_name
from bpftune.procnet import _pairs, _wanted_pairs, thread_counters
from bpftune.sysctl import name_of
from bpftune.tuner import Scenario, Tunable, Tuner
from bpftune.tuners.tcp_buffer import TcpBufferTuner as T


@pytest.mark.parametrize(("rate", "shift", "grown"), [
    (4, 2, 125), (3, 3, 112), (2, 4, 106), (1, 5, 103), (0, 6, 101)])
def test_learning_rate_steps(rate, shift, grown):
    lr = LearningRate(rate)
    assert lr.shift == shift
    assert lr.grow(100) == grown
    assert lr.shrink(100) == 100 - (grown - 100)


def test_learning_rate_nearly_full_and_empty():
    lr = LearningRate(4)  # within 25 %
    assert lr.nearly_full(75, 100) and lr.nearly_full(100, 100) and lr.nearly_full(120, 100)
    assert not lr.nearly_full(74, 100)
    assert lr.nearly_empty(25, 100) and not lr.nearly_empty(26, 100)
    lr0 = LearningRate(0)  # within 1.5625 %
    assert lr0.nearly_full(6300, 6400) and not lr0.nearly_full(6299, 6400)


def test_learning_rate_always_moves_small_values():
    # Upstream's GROW(3) is 3: a tiny limit could never grow.
    assert LearningRate(4).grow(3) == 4
    assert LearningRate(0).grow(1) == 2
    assert LearningRate(4).shrink(1) == 0


@pytest.mark.parametrize("bad", [-1, 5, 9])
def test_learning_rate_out_of_range(bad):
    with pytest.raises(LearningRateError, match="values 0-4 are supported"):
        LearningRate(bad)


def test_correlation_needs_enough_samples_and_variance():
    c = Correlation()
    for i in range(MIN_SAMPLES - 1):
        c.add(i, 2 * i)
    assert c.value() == 0.0 and not c.correlated()
    c.add(MIN_SAMPLES, 2 * MIN_SAMPLES)
    assert c.value() == pytest.approx(1.0) and c.correlated()
    flat = Correlation()
    for i in range(20):
        flat.add(i, 7)
    assert flat.value() == 0.0


def test_correlation_rise_is_the_least_squares_rise_across_x():
    c = Correlation()
    for i in range(MIN_SAMPLES):
        c.add(100 * i, 40_000 + 10 * i)  # 10 per 100 of x: 90 over x's range of 900
    assert c.correlated() and c.rise() == pytest.approx(90)
    assert Correlation().rise() == 0.0


def test_correlation_negative_and_window_forgets_old_samples():
    c = Correlation(window=12)
    for i in range(12):
        c.add(i, -i)
    assert c.value() == pytest.approx(-1.0)
    for i in range(12):  # the window now holds only rising samples
        c.add(100 + i, 5 * i)
    assert c.value() == pytest.approx(1.0)
    c.reset()
    assert len(c) == 0


def test_every_value_written_is_within_its_ceiling():
    assert within_ceiling((10, 20, 50), (100, 100, 40)) == (10, 20, 40)
    # already above the ceiling (tcp_mem max 2e9): what bpftune writes is cut to it
    assert within_ceiling((12, 25, 2_500_000_000), (100, 100, 40)) == (12, 25, 40)
    # decreases below the ceiling pass untouched
    assert within_ceiling((10, 20, 35), (100, 100, 40)) == (10, 20, 35)


def test_three_value_tunables_stay_ordered():
    assert ordered((4096, 131072, 6291456))
    assert not ordered((4096, 131072, 65536))


KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.fixture
def ram(monkeypatch, tmp_path):
    """``ram(bytes, {tunable: value})`` -> apply(tunable, proposal) through the real change
    path (Changes.apply, with its ledger in tmp_path) on that much (fake) RAM, over
    in-memory sysctls in the global netns; apply returns the value live afterwards."""
    def setup(ram_bytes: int, values: dict[str, tuple[int, ...]]):
        fake_ram(monkeypatch, ram_bytes, page_size=4 * KiB)
        kernel = Kernel({0: dict(values)}).installed(monkeypatch)
        changes = Changes(kernel, StateFile(str(tmp_path)))  # type: ignore[arg-type]
        tuner = SimpleNamespace(name=T.name, scenarios=T.scenarios)
        by_name = {t.name: t for t in T.tunables}

        def apply(name: str, proposal: tuple[int, ...]) -> tuple[int, ...]:
            changes.apply(tuner, by_name[name], T.scenarios.index(T.NEED_INCREASE), 0, proposal,
                          "{old} -> {new}")
            return kernel.value(name, 0)
        return apply
    return setup


@pytest.mark.parametrize("name", ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"])
def test_one_socket_buffer_never_grows_past_1_32nd_of_ram(ram, name):
    apply = ram(1 * GiB, {name: (4 * KiB, 128 * KiB, 16 * MiB)})
    assert apply(name, (4 * KiB, 128 * KiB, TiB)) == (4 * KiB, 128 * KiB, 32 * MiB)
    assert apply(name, (4 * KiB, 128 * KiB, 40 * MiB)) == (4 * KiB, 128 * KiB, 32 * MiB)
    # A larger value found there is not grown: what bpftune writes is cut to the ceiling.
    apply = ram(1 * GiB, {name: (4 * KiB, 128 * KiB, 64 * MiB)})
    assert apply(name, (4 * KiB, 128 * KiB, 80 * MiB)) == (4 * KiB, 128 * KiB, 32 * MiB)
    apply = ram(1 * GiB, {name: (4 * KiB, 128 * KiB, 64 * MiB)})
    assert apply(name, (4 * KiB, 128 * KiB, 48 * MiB)) == (4 * KiB, 128 * KiB, 32 * MiB)
    # A decrease below the ceiling passes untouched.
    assert apply(name, (4 * KiB, 128 * KiB, 24 * MiB)) == (4 * KiB, 128 * KiB, 24 * MiB)
    # Just under the ceiling, a small step still reaches it exactly.
    apply = ram(1 * GiB, {name: (4 * KiB, 128 * KiB, 32 * MiB - 1)})
    assert apply(name, (4 * KiB, 128 * KiB, 32 * MiB + 1)) == (4 * KiB, 128 * KiB, 32 * MiB)


def test_tcp_mem_never_grows_past_its_share_of_ram(ram):
    # 1 GiB is 262144 pages of 4 KiB: min <= 1/16, pressure <= 1/8, max <= 1/4 of that.
    apply = ram(1 * GiB, {"net.ipv4.tcp_mem": (1000, 2000, 3000)})
    assert apply("net.ipv4.tcp_mem", (10**9, 2 * 10**9, 3 * 10**9)) == (16384, 32768, 65536)


def test_nothing_grows_past_int_max_even_with_1_tib_of_ram(ram):
    # 1 TiB / 32 is 32 GiB, but the kernel keeps buffer sizes in ints.
    apply = ram(1 * TiB, {"net.ipv4.tcp_rmem": (4096, 131072, 6 * MiB)})
    assert apply("net.ipv4.tcp_rmem", (TiB, TiB, TiB)) == (2**31 - 1,) * 3


def test_plugin_names_accept_upstream_file_names():
    assert normalize_name("tcp_buffer_tuner.so") == "tcp_buffer"
    assert normalize_name("tcp_buffer") == "tcp_buffer"
    assert normalize_name("demo_tuner.py") == "demo"


def test_sysctl_names_from_cgroup_sysctl_paths():
    assert name_of("net/ipv4/tcp_rmem") == "net.ipv4.tcp_rmem"


def test_proc_net_counter_pairs(tmp_path):
    f = tmp_path / "netstat"
    f.write_text("TcpExt: SyncookiesSent SyncookiesRecv\nTcpExt: 3 4\n"
                 "IpExt: InNoRoutes\nIpExt: 9\n")
    assert _pairs(str(f)) == {"TcpExt:SyncookiesSent": 3, "TcpExt:SyncookiesRecv": 4,
                              "IpExt:InNoRoutes": 9}
    wanted = frozenset({"IpExt:InNoRoutes", "TcpExt:SyncookiesRecv"})
    assert _wanted_pairs(str(f), wanted) == {"TcpExt:SyncookiesRecv": 4, "IpExt:InNoRoutes": 9}


def test_thread_counters_reads_the_keys_asked_for_from_the_three_files():
    keys = {"Tcp:OutSegs", "TcpExt:ListenDrops", "Udp6RcvbufErrors", "Ip:ReasmFails"}
    found = thread_counters(keys)
    assert set(found) == keys and all(v >= 0 for v in found.values())
    assert set(thread_counters({"TcpExt:ListenDrops"})) == {"TcpExt:ListenDrops"}


SYNTHETIC_BTF = [
    {"id": 1, "kind": "INT", "name": "int", "size": 4},
    {"id": 2, "kind": "TYPEDEF", "name": "s32", "type_id": 1},
    {"id": 3, "kind": "STRUCT", "name": "inner", "size": 8, "members": [
        {"name": "a", "type_id": 1, "bits_offset": 0},
        {"name": "b", "type_id": 2, "bits_offset": 32}]},
    {"id": 4, "kind": "UNION", "name": "(anon)", "size": 8, "members": [
        {"name": "hidden", "type_id": 1, "bits_offset": 0}]},
    {"id": 5, "kind": "STRUCT", "name": "outer", "size": 32, "members": [
        {"name": "x", "type_id": 1, "bits_offset": 0},
        {"name": "(anon)", "type_id": 4, "bits_offset": 64},
        {"name": "in", "type_id": 3, "bits_offset": 128},
        {"name": "flags", "type_id": 1, "bits_offset": 196, "bitfield_size": 3},
        {"name": "wide", "type_id": 1, "bits_offset": 204, "bitfield_size": 6}]},
    {"id": 6, "kind": "STRUCT", "name": "outer", "size": 0, "members": []},  # forward decl
]


def test_btf_offsets_through_nesting_anonymous_members_and_typedefs():
    btf = Btf(SYNTHETIC_BTF)
    assert btf.locate("outer.in.b") == Location(20, 4)
    assert btf.locate("outer.hidden") == Location(8, 4)
    assert btf.offset(Field("outer.in.a", 4)) == 16


def test_btf_bitfields_give_the_byte_shift_and_mask_to_read_them():
    # outer.flags: 3 bits at bit 196 (= byte 24, bit 4), as sk_userlocks is on Linux 6.1.
    btf = Btf(SYNTHETIC_BTF)
    where = btf.field(Field("outer.flags", 1))
    assert (where.offset, where.size, where.shift, where.mask) == (24, 1, 4, 0b111)
    assert offset_defines(btf, {"OFF_FLAGS": Field("outer.flags", 1),
                                "OFF_X": Field("outer.x", 4)}) == [
        "-DOFF_FLAGS=24", "-DSHIFT_FLAGS=4", "-DMASK_FLAGS=0x7ULL",
        "-DOFF_X=0", "-DSHIFT_X=0", "-DMASK_X=0xffffffffULL"]
    # Reading a byte at 24 and shifting and masking gives the field's value.
    storage = 0b1000_0001 | (0b101 << 4)  # neighbours set on both sides
    assert (storage >> where.shift) & where.mask == 0b101


@pytest.mark.parametrize(("field", "message"), [
    (Field("outer.nothere", 4), "kernel has no field outer.nothere"),
    (Field("missing.x", 4), "no struct missing"),
    (Field("outer.wide", 1), "a 6-bit field at bit 4 of its byte, more than 1 bytes"),
    (Field("outer.x", 8), "is 4 bytes in this kernel, expected 8"),
])
def test_btf_mismatches_are_errors_not_wrong_offsets(field, message):
    with pytest.raises(BtfError, match=message):
        Btf(SYNTHETIC_BTF).offset(field)


def test_event_layout_matches_the_bpf_header():
    """BCC describes the C struct as clang laid it out (in the loader child); ctypes must
    agree field by field."""
    from bpftune.bpf import Programs, bpf_dir
    from bpftune.learning import LearningRate

    programs = Programs(Btf.load(), LearningRate(), lambda _event: None)
    try:
        module = programs.compile(
            bpf_dir() / "layout_test.bpf.c", 0, {},
            text='#include "bpftune.bpf.h"\nBPF_ARRAY(events, struct bpftune_event, 1);\n')
        compiled = module["events"].Leaf
        module.close()
    finally:
        programs.close()
    assert ct.sizeof(compiled) == ct.sizeof(Event)
    for name, _ in Event._fields_:
        assert getattr(compiled, name).offset == getattr(Event, name).offset, name


HOOK_BTF = Btf([
    {"id": 1, "kind": "FUNC", "name": "fast_path", "type_id": 0},
    {"id": 2, "kind": "TYPEDEF", "name": "btf_trace_common", "type_id": 0},
    {"id": 3, "kind": "TYPEDEF", "name": "btf_trace_newer", "type_id": 0},
])
WATCHES = (Watch("a", (fentry("fast_path"), raw_tp("newer"), raw_tp("common"))),
           Watch("b", (tp("cat/newest"), tp("cat/common"))),
           Watch("c", (raw_tp("absent"),), optional=True))
ALL = {"fentry", "raw_tracepoints", "tracepoints"}


@pytest.mark.parametrize(("features", "avoid", "chosen"), [
    (ALL, (), ["fentry/fast_path", "tp/cat/common"]),
    (ALL - {"fentry"}, (), ["raw_tp/newer", "tp/cat/common"]),
    (ALL - {"fentry"}, ("newer",), ["raw_tp/common", "tp/cat/common"]),
])
def test_plans_take_the_first_hook_the_kernel_offers(features, avoid, chosen):
    plan = make_plan(WATCHES, HOOK_BTF, features, avoid)
    assert [str(h) for h in plan.hooks.values()] == chosen
    assert plan.unwatched == ["c"]
    assert plan.cflags()[-1] == "-DHOOK_TP_common"
    assert plan.describe().endswith("(no hook for c)")


def test_a_required_watch_without_a_hook_is_a_plan_error():
    with pytest.raises(PlanError, match=r"no hook for b \(tried tp/cat/newest, tp/cat/common\)"):
        make_plan(WATCHES, HOOK_BTF, {"fentry", "raw_tracepoints"})


def test_ids_are_declared_once_as_attributes_and_compiled_in():
    class Declared(Tuner):
        name = "declared"
        FIRST = Tunable("net.a")
        SECOND = Tunable("net.b")
        GROWN = Scenario("grown", "it grew")

    assert Declared.tunables == (Declared.FIRST, Declared.SECOND)
    assert Declared.scenarios == (Declared.GROWN,)
    assert Declared.id_defines() == ["-DTUNABLE_FIRST=0", "-DTUNABLE_SECOND=1",
                                     "-DSCENARIO_GROWN=0"]
    with pytest.raises(TypeError, match="not both"):
        type("Both", (Tuner,), {"name": "both", "tunables": (), "X": Tunable("net.x")})


class _Counts(dict):
    """A BPF array of u64 as the tuner reads it; the lookups are counted."""

    Key = int
    lookups = 0

    def __getitem__(self, slot):
        self.lookups += 1
        return ct.c_uint64(self.get(slot, 0))


def test_sysctl_tick_reads_every_slot_only_when_the_total_of_global_writes_grew(monkeypatch):
    from bpftune.tuners import sysctl as sysctl_tuner

    tuner = object.__new__(sysctl_tuner.SysctlTuner)
    counts = _Counts()
    tuner.bpf = {"global_writes": counts}
    tuner.slots = ["net.core.rmem_max", "net.ipv4.tcp_rmem"]
    tuner.global_writes_seen, tuner.all_global_writes_seen = [0, 0], 0
    tuner.engine = SimpleNamespace(namespaces=SimpleNamespace(global_cookie=7))
    handed: list = []
    monkeypatch.setattr(tuner, "_hand_over", lambda *a: handed.append(a), raising=False)
    tuner.tick(0)
    assert counts.lookups == 1 and not handed
    # A write whose event was lost: counted in its slot and in the total.
    counts[1] = counts[sysctl_tuner.MAX_MANAGED] = 1
    tuner.tick(1)
    assert handed == [("net.ipv4.tcp_rmem", 7, "a process whose write event was lost")]
    lookups = counts.lookups
    tuner.tick(2)
    assert counts.lookups == lookups + 1 and len(handed) == 1


def test_global_proc_files_are_read_once_within_a_tick(tmp_path, monkeypatch):
    """The tuners and the verifier read softnet_stat (and CPU wait, neighbour caches) in
    the same tick: within one_reading() the file is read once, outside it every time."""
    from bpftune import procnet

    path = tmp_path / "softnet_stat"
    monkeypatch.setattr(procnet, "SOFTNET_STAT", str(path))
    path.write_text("0000000a 00000000 00000001\n")
    with procnet.one_reading():
        first = procnet.softnet_columns()
        path.write_text("0000000b 00000000 00000002\n")
        assert procnet.softnet_columns() == first == {0: (10, 0, 1)}
    assert procnet.softnet_columns() == {0: (11, 0, 2)}
