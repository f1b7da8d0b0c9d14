"""What a kernel is, from its BTF: struct field offsets (bitfields too), tracepoints,
functions and enum values.

BCC compiles against whatever kernel headers are installed, which on our machines belong to
another kernel version; their struct layouts are wrong here. So BPF programs read kernel
structs only at byte offsets resolved here and passed to the compile as -D constants. The
same BTF tells which hooks a kernel offers (see bpftune.hooks), so a plan can be made for
another kernel's BTF file as well as for the running one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cached_property

VMLINUX_BTF = os.environ.get("BPFTUNE_VMLINUX_BTF", "/sys/kernel/btf/vmlinux")
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


class Btf:
    def __init__(self, types: list[dict], source: str = "") -> None:
        self._types = {t["id"]: t for t in types}
        self.source = source

    @classmethod
    def load(cls, path: str = VMLINUX_BTF) -> Btf:
        """The BTF of the running kernel, or of a vmlinux ELF or raw BTF file."""
        bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
        try:
            out = subprocess.run([bpftool, "-j", "btf", "dump", "file", path],
                                 check=True, capture_output=True).stdout
            return cls(json.loads(out)["types"], path)
        except FileNotFoundError as e:
            raise BtfError("bpftool is not installed") from e
        except (subprocess.CalledProcessError, ValueError, KeyError):
            raise BtfError(f"cannot read kernel BTF from {path}") from None

    @cached_property
    def _structs(self) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for t in self._types.values():
            # A name may appear as a member-less forward declaration too: keep the definition.
            if t["kind"] in ("STRUCT", "UNION") and t.get("members"):
                found.setdefault(t["name"], t)
        return found

    @cached_property
    def _named(self) -> dict[tuple[str, str], dict]:
        """(kind, name) -> type, for functions, typedefs and enums."""
        return {(t["kind"], t["name"]): t for t in self._types.values()
                if t["kind"] in ("FUNC", "TYPEDEF", "ENUM", "ENUM64")}

    def _resolve(self, type_id: int) -> dict:
        t = self._types[type_id]
        while t["kind"] in _QUALIFIERS:
            t = self._types[t["type_id"]]
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
        if struct_name not in self._structs or not members:
            raise BtfError(f"no struct {struct_name} in kernel BTF")
        current = self._structs[struct_name]
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
        return ("TYPEDEF", f"btf_trace_{name}") in self._named

    def has_field(self, path: str) -> bool:
        try:
            self.locate(path)
        except BtfError:
            return False
        return True

    def has_function(self, name: str) -> bool:
        return ("FUNC", name) in self._named

    @cached_property
    def _enumerators(self) -> frozenset[str]:
        """Every enumerator, anonymous enums' too (uapi's BPF_SOCK_OPS_* are in one)."""
        return frozenset(v["name"] for t in self._types.values()
                         if t["kind"] in ("ENUM", "ENUM64") for v in t.get("values", ()))

    def has_enumerator(self, name: str) -> bool:
        return name in self._enumerators

    def enum_value(self, enum: str, name: str) -> int | None:
        for kind in ("ENUM", "ENUM64"):
            t = self._named.get((kind, enum))
            if t:
                return next((v["val"] for v in t["values"] if v["name"] == name), None)
        return None

    def returns_void(self, path: str) -> bool:
        """Whether the function pointer at ``path`` (e.g. ``dst_ops.gc``) returns void."""
        struct_name, member = path.split(".", 1)
        found = self._member(self._structs.get(struct_name, {}), member)
        if found is None:
            raise BtfError(f"kernel has no field {path}")
        pointer = self._resolve(found["type_id"])
        proto = self._types[pointer["type_id"]] if pointer["kind"] == "PTR" else pointer
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
