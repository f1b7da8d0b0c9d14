"""What a kernel is, from its BTF: struct field offsets (bitfields too), tracepoints,
functions and enum values.

BCC compiles against whatever kernel headers are installed, which on our machines belong to
another kernel version; their struct layouts are wrong here. So BPF programs read kernel
structs only at byte offsets resolved here and passed to the compile as -D constants. The
same BTF tells which hooks a kernel offers (see bpftune.hooks), so a plan can be made for
another kernel's BTF file as well as for the running one.

BTF is read with the distro's libbpf (through bpftune.libbpf): it parses the whole kernel's
BTF in about 10 ms and holds it as one C buffer of a few MiB, freed with the Btf. Types are
looked up by name in C (``btf__find_by_name_kind``) and decoded to Python only when a lookup
reaches them, in the shape of bpftool's JSON (``bpftool -j btf dump``), which tests also
use to describe small synthetic kernels.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes as ct
import os
import re
import struct
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from bpftune import libbpf

SYSFS_BTF = "/sys/kernel/btf/vmlinux"
VMLINUX_BTF = os.environ.get("BPFTUNE_VMLINUX_BTF", SYSFS_BTF)
_QUALIFIERS = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}


class BtfError(Exception):
    pass


@dataclass(frozen=True)
class Field:
    """A struct field the BPF side reads: ``sock.sk_rcvbuf`` is read as ``size`` bytes.
    A bitfield is read as the ``size`` bytes that hold it, then shifted and masked."""

    path: str
    size: int


@dataclass(frozen=True)
class Location:
    offset: int  # bytes from the start of the outermost struct
    size: int  # bytes of the field (of the bytes read, for a bitfield)
    shift: int = 0  # bitfields: bits to shift right after reading `size` bytes at offset
    bits: int = 0  # bitfields: width; 0 for whole fields

    @property
    def mask(self) -> int:
        return (1 << (self.bits or self.size * 8)) - 1


class _Table(Protocol):
    """BTF types as bpftool's JSON describes them: dicts with id, kind, name, and per kind
    size, type_id, members (name, type_id, bits_offset, bitfield_size), values (name,
    val), nr_elems, ret_type_id, params."""

    def type(self, type_id: int) -> dict: ...

    def find(self, kind: str, name: str) -> dict | None:
        """The first type of ``kind`` named ``name`` (forward declarations are of kind
        FWD)."""

    def has_enumerator(self, name: str) -> bool: ...


class _JsonTable:
    """Types given as bpftool's JSON (tests' synthetic kernels)."""

    def __init__(self, types: list[dict]) -> None:
        self._by_id = {t["id"]: t for t in types}
        self._named: dict[tuple[str, str], dict] = {}
        for t in types:
            self._named.setdefault((t["kind"], t.get("name", "(anon)")), t)
        self._enumerators = frozenset(v["name"] for t in types
                                      if t["kind"] in ("ENUM", "ENUM64")
                                      for v in t.get("values", ()))

    def type(self, type_id: int) -> dict:
        try:
            return self._by_id[type_id]
        except KeyError:
            raise BtfError(f"no type {type_id} in kernel BTF") from None

    def find(self, kind: str, name: str) -> dict | None:
        return self._named.get((kind, name))

    def has_enumerator(self, name: str) -> bool:
        return name in self._enumerators


# --- libbpf ------------------------------------------------------------------------------
# struct btf_type and what follows it per kind (uapi linux/btf.h).
KINDS = ("UNKN", "INT", "PTR", "ARRAY", "STRUCT", "UNION", "ENUM", "FWD", "TYPEDEF",
         "VOLATILE", "CONST", "RESTRICT", "FUNC", "FUNC_PROTO", "VAR", "DATASEC", "FLOAT",
         "DECL_TAG", "TYPE_TAG", "ENUM64")
_SIZED = {"INT", "STRUCT", "UNION", "ENUM", "ENUM64", "FLOAT", "DATASEC"}
BTF_MAGIC = 0xEB9F
_u32 = ct.c_uint32


class _Type(ct.Structure):
    _fields_ = [("name_off", _u32), ("info", _u32), ("size_or_type", _u32)]

    @property
    def kind(self) -> str:
        kind = (self.info >> 24) & 0x1F
        return KINDS[kind] if kind < len(KINDS) else "UNKN"

    @property
    def vlen(self) -> int:
        return self.info & 0xFFFF

    @property
    def kflag(self) -> bool:
        return bool(self.info >> 31)


class _Member(ct.Structure):
    _fields_ = [("name_off", _u32), ("type", _u32), ("offset", _u32)]


class _Array(ct.Structure):
    _fields_ = [("type", _u32), ("index_type", _u32), ("nelems", _u32)]


class _Enum(ct.Structure):
    _fields_ = [("name_off", _u32), ("val", ct.c_int32)]


class _Enum64(ct.Structure):
    _fields_ = [("name_off", _u32), ("lo", _u32), ("hi", _u32)]


class _Param(ct.Structure):
    _fields_ = [("name_off", _u32), ("type", _u32)]


_ENUM_RECORDS = {"ENUM": _Enum, "ENUM64": _Enum64}
_vp = ct.c_void_p
_SIGNATURES = {
    "btf__load_vmlinux_btf": (_vp, []),
    "btf__parse": (_vp, [ct.c_char_p, _vp]),
    "btf__free": (None, [_vp]),
    "btf__type_cnt": (_u32, [_vp]),
    "btf__type_by_id": (_vp, [_vp, _u32]),
    "btf__name_by_offset": (ct.c_char_p, [_vp, _u32]),
    "btf__find_by_name_kind": (ct.c_int32, [_vp, ct.c_char_p, _u32]),
    "btf__raw_data": (_vp, [_vp, ct.POINTER(_u32)]),
    "libbpf_set_print": (_vp, [_vp]),
}


_lib = libbpf.Functions(_SIGNATURES)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """libbpf prints why a file is not BTF ("failed to get EHDR") on stderr; we say it in
    one line of our own. Only around our calls: the print function is process-wide."""
    previous = _lib.libbpf_set_print(None)
    try:
        yield
    finally:
        _lib.libbpf_set_print(previous)


def _enum_val(kind: str, record, signed: bool) -> int:
    if kind == "ENUM":
        return record.val if signed else record.val & 0xFFFFFFFF
    val = record.hi << 32 | record.lo
    return val - (1 << 64) if signed and val >> 63 else val


class _LibbpfTable:
    """A libbpf ``struct btf``, decoded type by type as lookups reach them."""

    def __init__(self, handle: int) -> None:
        self._btf = handle
        self._count = _lib.btf__type_cnt(handle)
        self._types: dict[int, dict] = {}
        self._found: dict[tuple[str, str], dict | None] = {}
        self._enumerators: dict[str, bool] = {}
        weakref.finalize(self, _lib.btf__free, handle)

    @classmethod
    def open(cls, path: str) -> _LibbpfTable | None:
        """The running kernel's BTF (where libbpf finds it: sysfs, or a vmlinux in /boot
        and the other usual places), or a vmlinux ELF or raw BTF file; None if unreadable."""
        with _quiet():
            handle = (_lib.btf__load_vmlinux_btf() if path == SYSFS_BTF
                      else _lib.btf__parse(path.encode(), None))
        return cls(handle) if handle else None

    def _name(self, offset: int) -> str:
        # bpftool's name for what has none (anonymous structs, unions and members).
        return (_lib.btf__name_by_offset(self._btf, offset) or b"").decode() or "(anon)"

    def _address(self, type_id: int) -> int:
        address = _lib.btf__type_by_id(self._btf, type_id) if type_id < self._count else None
        if not address:
            raise BtfError(f"no type {type_id} in kernel BTF")
        return address

    def type(self, type_id: int) -> dict:
        decoded = self._types.get(type_id)
        if decoded is None:
            decoded = self._types[type_id] = self._decode(type_id)
        return decoded

    def _decode(self, type_id: int) -> dict:
        address = self._address(type_id)
        t = _Type.from_address(address)
        kind, vlen = t.kind, t.vlen
        after = address + ct.sizeof(_Type)  # the kind's records follow the type
        d = {"id": type_id, "kind": kind, "name": self._name(t.name_off)}
        d["size" if kind in _SIZED else "type_id"] = t.size_or_type
        if kind in ("STRUCT", "UNION"):
            d["members"] = [self._member(m, t.kflag)
                            for m in (_Member * vlen).from_address(after)]
        elif kind in _ENUM_RECORDS:
            d["values"] = [{"name": self._name(v.name_off), "val": _enum_val(kind, v, t.kflag)}
                           for v in (_ENUM_RECORDS[kind] * vlen).from_address(after)]
        elif kind == "ARRAY":
            a = _Array.from_address(after)
            d.update(type_id=a.type, index_type_id=a.index_type, nr_elems=a.nelems)
        elif kind == "FUNC_PROTO":
            d["ret_type_id"] = d.pop("type_id")
            d["params"] = [{"name": self._name(p.name_off), "type_id": p.type}
                           for p in (_Param * vlen).from_address(after)]
        return d

    def _member(self, m: _Member, kflag: bool) -> dict:
        member = {"name": self._name(m.name_off), "type_id": m.type, "bits_offset": m.offset}
        # With kflag, the top 8 bits of the offset are a bitfield's width (0: not one).
        if kflag:
            member["bits_offset"] = m.offset & 0xFFFFFF
            if m.offset >> 24:
                member["bitfield_size"] = m.offset >> 24
        return member

    def find(self, kind: str, name: str) -> dict | None:
        key = (kind, name)
        if key not in self._found:
            found = _lib.btf__find_by_name_kind(self._btf, name.encode(), KINDS.index(kind))
            self._found[key] = self.type(found) if found > 0 else None
        return self._found[key]

    def has_enumerator(self, name: str) -> bool:
        if name not in self._enumerators:
            found = self._search_enumerator(name)
            if found is None:  # BTF of the other byte order
                found = any(v["name"] == name for t in self._enums() for v in t["values"])
            self._enumerators[name] = found
        return self._enumerators[name]

    def _enums(self) -> Iterator[dict]:
        """Every enum, anonymous ones too (uapi's BPF_SOCK_OPS_* are in one): a walk
        over all types, ~0.1 s."""
        for type_id in range(1, self._count):
            if _Type.from_address(self._address(type_id)).kind in _ENUM_RECORDS:
                yield self.type(type_id)

    def _search_enumerator(self, name: str) -> bool | None:
        """Whether an enum has a value ``name``, by byte searches (C speed) instead of a
        walk over every type: the name's offset in the string section, then that offset
        as a 32-bit word in the type section, where it must be an enum value's name. None
        if libbpf's types are not the raw data's (BTF of the other byte order)."""
        size = _u32()
        base = _lib.btf__raw_data(self._btf, ct.byref(size))
        # The regular expressions search libbpf's buffer in place: no copy of 5 MiB.
        raw = memoryview((ct.c_ubyte * size.value).from_address(base)).cast("B")
        magic, _, _, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("=HBBIIIII", raw)
        types, strings = hdr_len + type_off, hdr_len + str_off
        if magic != BTF_MAGIC or self._address(1) != base + types:
            return None
        for at in _occurrences(b"\0" + name.encode() + b"\0", raw, strings, strings + str_len):
            word = (at + 1 - strings).to_bytes(4, sys.byteorder)
            if self._is_enumerator_name(raw, base, types, types + type_len, word):
                return True
        return False

    def _is_enumerator_name(self, raw: memoryview, base: int, types: int, end: int,
                            word: bytes) -> bool:
        """Whether ``word`` (a name offset) is in raw[types:end] as an enum value's name:
        each aligned occurrence is placed in its type by bisecting the types' addresses."""
        addresses = _Addresses(self)
        for offset in _occurrences(word, raw, types, end):
            at = base + offset
            if (offset - types) % 4:
                continue
            type_id = bisect.bisect_right(addresses, at) - 1
            t = _Type.from_address(addresses[type_id])
            record = ct.sizeof(_ENUM_RECORDS.get(t.kind, _Type))
            into = at - addresses[type_id] - ct.sizeof(_Type)
            if t.kind in _ENUM_RECORDS and 0 <= into < t.vlen * record and into % record == 0:
                return True
        return False


def _occurrences(needle: bytes, buffer: memoryview, pos: int, end: int) -> Iterator[int]:
    """Where ``needle`` starts in buffer[pos:end], overlapping occurrences too."""
    pattern = re.compile(re.escape(needle))
    while found := pattern.search(buffer, pos, end):
        yield found.start()
        pos = found.start() + 1


class _Addresses:
    """The types' addresses by id, ascending (libbpf keeps them in id order in one
    buffer): a sequence to bisect."""

    def __init__(self, table: _LibbpfTable) -> None:
        self._table = table

    def __len__(self) -> int:
        return self._table._count

    def __getitem__(self, type_id: int) -> int:
        return self._table._address(type_id) if type_id else 0


class Btf:
    def __init__(self, types: list[dict] | _Table, source: str = "") -> None:
        """``types`` as bpftool's JSON gives them (a synthetic kernel), or a table."""
        self._table: _Table = _JsonTable(types) if isinstance(types, list) else types
        self.source = source

    @classmethod
    def load(cls, path: str = VMLINUX_BTF) -> Btf:
        """The BTF of the running kernel, or of a vmlinux ELF or raw BTF file."""
        try:
            table = _LibbpfTable.open(path)
        except libbpf.BpfError as e:  # no libbpf.so.1
            raise BtfError(str(e)) from None
        if table is None:
            raise BtfError(f"cannot read kernel BTF from {path}")
        return cls(table, path)

    def _struct(self, name: str) -> dict | None:
        return self._table.find("STRUCT", name) or self._table.find("UNION", name)

    def _resolve(self, type_id: int) -> dict:
        t = self._table.type(type_id)
        while t["kind"] in _QUALIFIERS:
            t = self._table.type(t["type_id"])
        return t

    def _size(self, type_id: int) -> int:
        t = self._resolve(type_id)
        if t["kind"] == "ARRAY":
            return t["nr_elems"] * self._size(t["type_id"])
        if t["kind"] == "PTR":
            return 8
        return t["size"]

    def _member(self, struct: dict, name: str) -> dict | None:
        """The member ``name`` of ``struct`` (bits_offset from the struct's start), looking
        into anonymous members."""
        for m in struct.get("members", []):
            if m["name"] == name:
                return m
            if m["name"] == "(anon)":
                inner = self._resolve(m["type_id"])
                found = self._member(inner, name) if inner["kind"] in ("STRUCT", "UNION") else None
                if found:
                    return found | {"bits_offset": m["bits_offset"] + found["bits_offset"]}
        return None

    def locate(self, path: str) -> Location:
        """Where a dotted field path such as ``net.ipv4.sysctl_tcp_rmem`` is."""
        struct_name, *members = path.split(".")
        current = self._struct(struct_name)
        if current is None or not members:
            raise BtfError(f"no struct {struct_name} in kernel BTF")
        bits = 0
        member: dict = {}
        for name in members:
            found = self._member(current, name)
            if found is None:
                raise BtfError(f"kernel has no field {path}")
            if member.get("bitfield_size"):
                raise BtfError(f"{path}: cannot look into a bitfield")
            member = found
            bits += found["bits_offset"]
            current = self._resolve(found["type_id"])
        width = member.get("bitfield_size", 0)
        if width:
            return Location(bits // 8, 0, bits % 8, width)
        if bits % 8:
            raise BtfError(f"{path} is not byte aligned")
        return Location(bits // 8, self._size(member["type_id"]))

    def field(self, field: Field) -> Location:
        """Where ``field`` is, checked against the size the BPF program reads."""
        where = self.locate(field.path)
        if where.bits:  # a bitfield: the bytes read must hold all of its bits
            if where.shift + where.bits > field.size * 8:
                raise BtfError(f"{field.path} is a {where.bits}-bit field at bit {where.shift} "
                               f"of its byte, more than {field.size} bytes can hold")
            return Location(where.offset, field.size, where.shift, where.bits)
        if where.size != field.size:
            raise BtfError(f"{field.path} is {where.size} bytes in this kernel, "
                           f"expected {field.size}")
        return where

    def offset(self, field: Field) -> int:
        return self.field(field).offset

    # What the kernel offers.
    def has_tracepoint(self, name: str) -> bool:
        """Tracepoints appear in BTF as ``btf_trace_<name>`` typedefs (raw tracepoint
        prototypes: a context pointer, then the tracepoint's arguments)."""
        return self._table.find("TYPEDEF", f"btf_trace_{name}") is not None

    def has_field(self, path: str) -> bool:
        try:
            self.locate(path)
        except BtfError:
            return False
        return True

    def has_function(self, name: str) -> bool:
        return self._table.find("FUNC", name) is not None

    def function_id(self, name: str) -> int:
        """The BTF id of function ``name`` (what a tracing program attaches to)."""
        found = self._table.find("FUNC", name)
        if found is None:
            raise BtfError(f"no function {name} in kernel BTF")
        return found["id"]

    def has_enumerator(self, name: str) -> bool:
        """Whether any enum has ``name``, anonymous enums too (uapi's BPF_SOCK_OPS_*
        are in one)."""
        return self._table.has_enumerator(name)

    def enum_value(self, enum: str, name: str) -> int | None:
        for kind in ("ENUM", "ENUM64"):
            t = self._table.find(kind, enum)
            if t:
                return next((v["val"] for v in t["values"] if v["name"] == name), None)
        return None

    def returns_void(self, path: str) -> bool:
        """Whether the function pointer at ``path`` (e.g. ``dst_ops.gc``) returns void."""
        struct_name, member = path.split(".", 1)
        found = self._member(self._struct(struct_name) or {}, member)
        if found is None:
            raise BtfError(f"kernel has no field {path}")
        pointer = self._resolve(found["type_id"])
        proto = self._table.type(pointer["type_id"]) if pointer["kind"] == "PTR" else pointer
        if proto["kind"] != "FUNC_PROTO":
            raise BtfError(f"{path} is not a function pointer")
        return proto["ret_type_id"] == 0


def offset_defines(btf: Btf, fields: dict[str, Field]) -> list[str]:
    """Compiler flags for every field named OFF_<X>: ``-DOFF_<X>`` (byte offset), and
    ``-DSHIFT_<X>``, ``-DMASK_<X>`` for READ_FIELD (bpftune.bpf.h), which reads bitfields
    and whole fields alike. BtfError if a field is missing or does not fit."""
    flags = []
    for name, field in fields.items():
        where = btf.field(field)
        base = name.removeprefix("OFF_")
        flags += [f"-DOFF_{base}={where.offset}", f"-DSHIFT_{base}={where.shift}",
                  f"-DMASK_{base}={where.mask:#x}ULL"]
    return flags
