"""Check: the daemon-side decoder (libbpf.ctype_of) builds the same ctypes layouts as BCC
for harder map types (array of structs, bitfields, union, nested struct, char array).
Needs bcc: run with /usr/bin/python3; it only creates one map (no program is loaded)."""
import ctypes as ct
import json

import bcc
import libbpf

text = b"""
struct alg { u64 metric; u32 count; u16 greedy; u8 flags:3, on:1; };
union u { u32 a; u8 b[4]; };
struct host_key { u64 netns_cookie; u32 addr[4]; };
struct host_state { struct alg algs[6]; u32 bbr_switches; union u un; struct { u16 x; u16 y; } anon_named; char name[16]; };
BPF_TABLE("lru_hash", struct host_key, struct host_state, hosts, 16);
"""
b = bcc.BPF(text=text)
t = b["hosts"]
def shape(c):
    if hasattr(c, "_fields_"):
        return [(f[0], getattr(c, f[0]).offset, getattr(c, f[0]).size, shape(f[1])) for f in c._fields_]
    if hasattr(c, "_length_"):
        return [c._length_, shape(c._type_)]
    return ct.sizeof(c)
for which, ours_desc, theirs in (("key", bcc.lib.bpf_table_key_desc(b.module, b"hosts"), t.Key),
                                  ("leaf", bcc.lib.bpf_table_leaf_desc(b.module, b"hosts"), t.Leaf)):
    ours = libbpf.ctype_of(json.loads(ours_desc))
    print(which, "same layout" if shape(ours) == shape(theirs) else "DIFFERENT", ct.sizeof(ours), ct.sizeof(theirs))
    if which == "leaf":
        print(ours_desc.decode()[:300])
