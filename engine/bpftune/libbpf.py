"""The daemon's side of BPF: the distro's libbpf (libbpf.so.1, Debian's libbpf1, Fedora's
libbpf) through ctypes.

The daemon never imports bcc, so LLVM is never mapped in it (issue 13: 143 MiB of RSS).
A loader child compiles with BCC and hands over program, map and attachment file
descriptors; here maps, per-CPU values, ring buffers and cgroup attachments are worked on
through libbpf's low-level API. Map key/value layouts come as BCC's own JSON type
descriptions (sent by the child) and become ctypes types, so tuner code keeps BCC's
``table.Key(...)``, ``k.field``, ``sum(percpu_table[i])`` idioms.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
from collections.abc import Callable, Iterator
from functools import cache

from bpftune.log import log

LIBRARY = "libbpf.so.1"


class BpfError(Exception):
    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


@cache
def _library() -> ct.CDLL:
    try:
        return ct.CDLL(LIBRARY, use_errno=True)
    except OSError:
        raise BpfError(f"{LIBRARY} is not installed (Debian/Ubuntu: libbpf1, "
                       "Fedora/RHEL: libbpf)") from None


def function(name: str, restype, argtypes: list):
    """A libbpf function, declared (ctypes' int default would truncate pointers)."""
    fn = getattr(_library(), name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


# enum bpf_map_type values: the ones the daemon creates, and the per-CPU ones.
MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_HASH, MAP_LRU_PERCPU_HASH, MAP_RINGBUF = 5, 6, 9, 10, 27
PERCPU_TYPES = {MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH}
# enum bpf_attach_type values bpftune attaches to its cgroup.
BPF_CGROUP_SOCK_OPS, BPF_CGROUP_SYSCTL = 3, 18
BPF_F_ALLOW_MULTI = 2
BPF_OBJ_NAME_LEN = 16

SAMPLE_FN = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


class MapInfo(ct.Structure):
    """struct bpf_map_info (uapi), up to the fields we read."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * BPF_OBJ_NAME_LEN),
                ("ifindex", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
                ("btf_id", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32), ("_pad", ct.c_uint32),
                ("map_extra", ct.c_uint64)]


class ProgInfo(ct.Structure):
    """struct bpf_prog_info (uapi), up to the name: the kernel accepts a shorter struct."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
                ("name", ct.c_char * BPF_OBJ_NAME_LEN)]


_vp, _i, _u32 = ct.c_void_p, ct.c_int, ct.c_uint32
_SIGNATURES = {
    "bpf_map_lookup_elem": (_i, [_i, _vp, _vp]),
    "bpf_map_update_elem": (_i, [_i, _vp, _vp, ct.c_uint64]),
    "bpf_map_delete_elem": (_i, [_i, _vp]),
    "bpf_map_get_next_key": (_i, [_i, _vp, _vp]),
    "bpf_obj_get_info_by_fd": (_i, [_i, _vp, ct.POINTER(_u32)]),
    "bpf_map_create": (_i, [_i, ct.c_char_p, _u32, _u32, _u32, _vp]),
    "bpf_prog_attach": (_i, [_i, _i, _i, ct.c_uint]),
    "bpf_prog_detach2": (_i, [_i, _i, _i]),
    "bpf_link_create": (_i, [_i, _i, _i, _vp]),
    "bpf_prog_query": (_i, [_i, _i, _u32, ct.POINTER(_u32), ct.POINTER(_u32),
                           ct.POINTER(_u32)]),
    "bpf_prog_get_fd_by_id": (_i, [_u32]),
    "libbpf_num_possible_cpus": (_i, []),
    "ring_buffer__new": (_vp, [_i, SAMPLE_FN, _vp, _vp]),
    "ring_buffer__add": (_i, [_vp, _i, SAMPLE_FN, _vp]),
    "ring_buffer__poll": (_i, [_vp, _i]),
    "ring_buffer__consume": (_i, [_vp]),
    "ring_buffer__free": (None, [_vp]),
}


class Functions:
    """libbpf functions by name, declared on first use from ``signatures``:
    name -> (restype, argtypes). Each module declares the ones it uses."""

    def __init__(self, signatures: dict[str, tuple]) -> None:
        self._signatures = signatures

    def __getattr__(self, name: str):
        fn = function(name, *self._signatures[name])
        setattr(self, name, fn)
        return fn


_lib = Functions(_SIGNATURES)


def _check(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno (and sets errno) on failure."""
    if ret < 0:
        raise BpfError(f"{what}: {os.strerror(-ret)}", -ret)
    return ret


def possible_cpus() -> int:
    return _check(_lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def map_info(fd: int) -> MapInfo:
    info, size = MapInfo(), ct.c_uint32(ct.sizeof(MapInfo))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "map info")
    return info


def prog_info(fd: int) -> ProgInfo:
    info, size = ProgInfo(), ct.c_uint32(ct.sizeof(ProgInfo))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "prog info")
    return info


def map_create(map_type: int, name: str, key_size: int, value_size: int,
               max_entries: int) -> int:
    """A map made by the daemon itself (the shared ones: no compiler needed)."""
    return _check(_lib.bpf_map_create(map_type, name.encode(), key_size, value_size,
                                      max_entries, None), f"create map {name}")




# --- Map layouts: BCC's JSON type descriptions -> ctypes --------------------------------
_SCALARS = {
    "_Bool": ct.c_bool, "char": ct.c_char, "signed char": ct.c_byte,
    "unsigned char": ct.c_ubyte, "short": ct.c_short, "unsigned short": ct.c_ushort,
    "int": ct.c_int, "unsigned int": ct.c_uint, "long": ct.c_long,
    "unsigned long": ct.c_ulong, "long long": ct.c_longlong,
    "unsigned long long": ct.c_ulonglong, "float": ct.c_float, "double": ct.c_double,
    "__int128": ct.c_int64 * 2, "unsigned __int128": ct.c_uint64 * 2,
}


def ctype_of(desc):
    """A ctypes type from BCC's description: a scalar name, or
    [name, [[field, type(, [dim] | bits | "struct"/"union")]...], "struct"|"union"|...]."""
    if isinstance(desc, str):
        return _SCALARS[desc]
    fields, anonymous = [], []
    for f in desc[1]:
        name, sub = f[0], f[1]
        extra = f[2] if len(f) > 2 else None
        if isinstance(extra, list):  # array (BCC gives one dimension per level)
            fields.append((name, ctype_of(sub) * extra[0]))
        elif isinstance(extra, int):  # bitfield width
            fields.append((name, ctype_of(sub), extra))
        elif isinstance(extra, str):  # nested struct/union described inline
            if not name:
                name = f"__anon{len(anonymous)}"
                anonymous.append(name)
            fields.append((name, ctype_of(f)))
        else:
            fields.append((name, ctype_of(sub)))
    kind = desc[2] if len(desc) > 2 else "struct"
    base = ct.Union if kind == "union" else ct.Structure
    attrs = {"_fields_": fields, "_anonymous_": anonymous}
    if kind == "struct_packed":
        attrs["_pack_"] = 1
    return type(str(desc[0]) or "anon", (base,), attrs)


# --- Maps --------------------------------------------------------------------------------
class Table:
    """A BPF map by fd with BCC's Table idioms (the subset bpftune's tuners use):
    ``t[k]``, ``t[k] = v``, ``del t[k]`` (KeyError if absent), iteration over keys,
    ``items()``, ``Key``/``Leaf``; per-CPU maps give and take one Leaf per possible CPU."""

    def __init__(self, name: str, fd: int, key_desc, leaf_desc) -> None:
        self.name, self.fd = name, fd
        info = map_info(fd)
        self.map_type = info.type
        self.Key = ctype_of(key_desc)
        self.Leaf = ctype_of(leaf_desc)
        # The layouts came from the compiler; the kernel's sizes say whether they fit.
        if ct.sizeof(self.Key) != info.key_size or ct.sizeof(self.Leaf) != info.value_size:
            raise BpfError(f"{name}: layout {ct.sizeof(self.Key)}/{ct.sizeof(self.Leaf)}"
                              f" != kernel's {info.key_size}/{info.value_size}")
        self.percpu = self.map_type in PERCPU_TYPES
        if self.percpu:
            # The kernel copies round_up(value_size, 8) bytes per possible CPU.
            stride = (info.value_size + 7) & ~7
            self.ncpus = possible_cpus()
            self._cell = self.Leaf if stride == info.value_size else \
                type("Cell", (ct.Structure,), {"_fields_": [("v", self.Leaf),
                     ("_pad", ct.c_uint8 * (stride - info.value_size))]})
            self._value_type = self._cell * self.ncpus
        else:
            self._value_type = self.Leaf

    def _key(self, key):
        if isinstance(key, self.Key):
            return key
        if isinstance(key, ct._SimpleCData):  # BCC also takes e.g. ct.c_uint64(cookie)
            return self.Key(key.value)
        return self.Key(key)  # an int index of an array map

    def _cells(self, value):
        return [c.v for c in value] if self._cell is not self.Leaf else list(value)

    def __getitem__(self, key):
        value = self._value_type()
        ret = _lib.bpf_map_lookup_elem(self.fd, ct.byref(self._key(key)), ct.byref(value))
        if ret < 0:
            raise KeyError(key)
        if self.percpu:  # as BCC: an array of one Leaf per CPU
            return (self.Leaf * self.ncpus)(*self._cells(value))
        return value

    def __setitem__(self, key, leaf) -> None:
        if self.percpu:  # a list with one value per CPU, or one value for every CPU
            values = list(leaf) if isinstance(leaf, (list, tuple, ct.Array)) \
                else [leaf] * self.ncpus
            value = self._value_type()
            for i, v in enumerate(values):
                if self._cell is self.Leaf:
                    value[i] = v
                else:
                    value[i].v = v
        else:
            value = leaf if isinstance(leaf, self.Leaf) else self.Leaf(
                leaf.value if isinstance(leaf, ct._SimpleCData) else leaf)
        _check(_lib.bpf_map_update_elem(self.fd, ct.byref(self._key(key)),
                                        ct.byref(value), 0), f"update {self.name}")

    def __delitem__(self, key) -> None:
        if _lib.bpf_map_delete_elem(self.fd, ct.byref(self._key(key))) < 0:
            raise KeyError(key)

    def __iter__(self) -> Iterator:
        """Keys by bpf_map_get_next_key; a key deleted meanwhile restarts from the first
        (the kernel's behaviour for hash maps), as BCC's iterator does."""
        key, nxt = None, self.Key()
        while True:
            ret = _lib.bpf_map_get_next_key(self.fd, None if key is None else ct.byref(key),
                                            ct.byref(nxt))
            if ret < 0:
                return
            key = self.Key.from_buffer_copy(nxt)
            yield key

    def keys(self) -> list:
        return list(self)

    def items(self) -> list:
        out = []
        for k in self:
            # deleted (LRU eviction, the program) between the two calls
            with contextlib.suppress(KeyError):
                out.append((k, self[k]))
        return out

    def values(self) -> list:
        return [v for _, v in self.items()]


# --- Ring buffers ------------------------------------------------------------------------
class RingBuffers:
    """One libbpf ring_buffer manager over several ring buffer maps (bpftune: tuning events
    and administrators' events), polled by the daemon's main loop."""

    def __init__(self) -> None:
        self._rb = None
        self._callbacks: list = []  # keep the ctypes thunks alive: libbpf holds pointers

    def add(self, map_fd: int, on_sample: Callable[[int, int], None]) -> None:
        def thunk(_ctx, data, size):
            try:
                on_sample(data, size)
            except Exception as e:
                log.err(f"ring buffer callback: {e!r}")
            return 0

        cb = SAMPLE_FN(thunk)
        self._callbacks.append(cb)
        if self._rb is None:
            self._rb = _lib.ring_buffer__new(map_fd, cb, None, None)
            if not self._rb:
                raise BpfError(f"ring_buffer__new: {os.strerror(ct.get_errno())}", ct.get_errno())
        else:
            _check(_lib.ring_buffer__add(self._rb, map_fd, cb, None), "ring_buffer__add")

    def poll(self, timeout_ms: int) -> int:
        """Events handled (or -errno; -EINTR when a signal arrives: not an error)."""
        return _lib.ring_buffer__poll(self._rb, timeout_ms)

    def consume(self) -> int:
        return _lib.ring_buffer__consume(self._rb)

    def close(self) -> None:
        if self._rb:
            _lib.ring_buffer__free(self._rb)
            self._rb = None


# --- Cgroup programs -----------------------------------------------------------------------
def cgroup_attach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    """Legacy attach: stays attached when every fd is closed (a kill -9 leaves it)."""
    _check(_lib.bpf_prog_attach(prog_fd, cgroup_fd, attach_type, BPF_F_ALLOW_MULTI),
           "bpf_prog_attach")


def cgroup_detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    _check(_lib.bpf_prog_detach2(prog_fd, cgroup_fd, attach_type), "bpf_prog_detach2")


def cgroup_link(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    """bpf_link attach: a link fd; the program is detached when the last fd closes
    (daemon exit, kill -9 included). Coexists with BPF_F_ALLOW_MULTI attachments."""
    return _check(_lib.bpf_link_create(prog_fd, cgroup_fd, attach_type, None),
                  "bpf_link_create")


def cgroup_programs(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to the cgroup itself (not inherited)."""
    ids = (ct.c_uint32 * 64)()
    count, flags = ct.c_uint32(64), ct.c_uint32(0)
    _check(_lib.bpf_prog_query(cgroup_fd, attach_type, 0, ct.byref(flags), ids,
                               ct.byref(count)), "bpf_prog_query")
    return list(ids[:count.value])


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib.bpf_prog_get_fd_by_id(prog_id), f"prog id {prog_id}")




def detach_stale(cgroup_fd: int, attach_type: int, names: set[str]) -> list[str]:
    """Detach the programs attached to the cgroup (not through a link) whose names are
    ``names``: what a killed bpftune of a version before links left. The kernel keeps 15
    characters of a program's name."""
    detached = []
    for prog_id in cgroup_programs(cgroup_fd, attach_type):
        fd = prog_fd_by_id(prog_id)
        try:
            name = prog_info(fd).name.decode()
            if name in {n[:BPF_OBJ_NAME_LEN - 1] for n in names}:
                cgroup_detach(fd, cgroup_fd, attach_type)
                detached.append(f"{name} (id {prog_id})")
        finally:
            os.close(fd)
    return detached
