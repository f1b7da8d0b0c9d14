"""Kernel struct field offsets from the running kernel's BTF.

BCC compiles against whatever kernel headers are installed, which on our machines belong to
another kernel version; their struct layouts are wrong here. So BPF programs read kernel
structs only at byte offsets resolved here and passed to the compile as -D constants.
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
    """A struct field the BPF side reads: ``sock.sk_rcvbuf`` is read as ``size`` bytes."""

    path: str
    size: int


class Btf:
    def __init__(self, types: list[dict]) -> None:
        self._types = {t["id"]: t for t in types}

    @classmethod
    def load(cls, path: str = VMLINUX_BTF) -> Btf:
        bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
        try:
            out = subprocess.run([bpftool, "-j", "btf", "dump", "file", path],
                                 check=True, capture_output=True).stdout
        except FileNotFoundError as e:
            raise BtfError("bpftool is not installed") from e
        except subprocess.CalledProcessError:
            raise BtfError(f"cannot read kernel BTF from {path}") from None
        return cls(json.loads(out)["types"])

    @cached_property
    def _structs(self) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for t in self._types.values():
            # A name may appear as a member-less forward declaration too: keep the definition.
            if t["kind"] in ("STRUCT", "UNION") and t.get("members"):
                found.setdefault(t["name"], t)
        return found

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

    def _member(self, struct: dict, name: str) -> tuple[int, int] | None:
        """(bit offset, type id) of ``name`` in ``struct``, looking into anonymous members."""
        for m in struct.get("members", []):
            if m["name"] == name:
                if m.get("bitfield_size"):
                    raise BtfError(f"{struct['name']}.{name} is a bitfield")
                return m["bits_offset"], m["type_id"]
            if m["name"] == "(anon)":
                inner = self._resolve(m["type_id"])
                found = self._member(inner, name) if inner["kind"] in ("STRUCT", "UNION") else None
                if found:
                    return m["bits_offset"] + found[0], found[1]
        return None

    def locate(self, path: str) -> tuple[int, int]:
        """Byte offset and size of a dotted field path such as ``net.ipv4.sysctl_tcp_rmem``."""
        struct_name, *members = path.split(".")
        if struct_name not in self._structs or not members:
            raise BtfError(f"no struct {struct_name} in kernel BTF")
        current = self._structs[struct_name]
        bits = 0
        type_id = current["id"]
        for name in members:
            found = self._member(current, name)
            if found is None:
                raise BtfError(f"kernel has no field {path}")
            bits += found[0]
            type_id = found[1]
            current = self._resolve(type_id)
        if bits % 8:
            raise BtfError(f"{path} is not byte aligned")
        return bits // 8, self._size(type_id)

    def offset(self, field: Field) -> int:
        offset, size = self.locate(field.path)
        if size != field.size:
            raise BtfError(f"{field.path} is {size} bytes in this kernel, expected {field.size}")
        return offset


def offset_defines(btf: Btf, fields: dict[str, Field]) -> list[str]:
    """``-DOFF_X=n`` compiler flags for every named field (BtfError if one is missing)."""
    return [f"-D{name}={btf.offset(field)}" for name, field in fields.items()]
