"""What imports cost the daemon: VmRSS and wall time of each scenario in a fresh
/usr/bin/python3 (one process per scenario, so nothing is shared or cached in-process).

Scenarios: the prototype parent's imports (ctypes + libbpf.so.1), bcc, pyroute2 in full,
the pyroute2 parts bpftune uses imported normally (pyroute2/__init__.py still runs: it
loads every entry point of the "pyroute2" group, i.e. most of the library) and with the
package __init__ bypassed, and bpftune's engine (read-only checkout /work/main, bcc
blocked) with each pyroute2 variant; finally the BTF parse the daemon does at start-up.
"""

import json
import subprocess
import sys

ENGINE = "/work/main/engine"

PRELUDE = r"""
import time, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith(('VmRSS', 'VmHWM')):
            yield line.split(':')[0], int(line.split()[1])
before = dict(rss()); t = time.monotonic()
"""
REPORT = r"""
after = dict(rss())
print(__import__('json').dumps({'before_kib': before['VmRSS'], 'after_kib': after['VmRSS'],
      'hwm_kib': after['VmHWM'], 'import_s': round(time.monotonic() - t, 3),
      'modules': len(sys.modules), **globals().get('EXTRA', {})}))
"""
# bpftune's pyroute2 imports (grep 'pyroute2' engine/bpftune: neigh.py, netns.py,
# netns_watch.py): IPRoute, NetlinkError, netns.listnetns/setns, netlink flags and nla,
# rtnl RTM_* constants, ndtmsg, nsidmsg.
PYROUTE2_USED = """
from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2 import netns
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, nla
from pyroute2.netlink.rtnl import RTM_GETNEIGHTBL, RTM_NEWNSID
from pyroute2.netlink.rtnl.ndtmsg import ndtmsg
from pyroute2.netlink.rtnl.nsidmsg import nsidmsg
"""
# Skip pyroute2/__init__.py (its entry-point loading) by registering the bare package.
BYPASS_INIT = """
import importlib.util, types
spec = importlib.util.find_spec('pyroute2')
pkg = types.ModuleType('pyroute2'); pkg.__path__ = list(spec.submodule_search_locations)
sys.modules['pyroute2'] = pkg
def _lazy(name):  # what bpftune takes from the package itself: from pyroute2 import IPRoute
    where = {'IPRoute': 'pyroute2.iproute.linux', 'NetlinkError': 'pyroute2.netlink.exceptions'}
    if name not in where:
        raise AttributeError(name)
    return getattr(importlib.import_module(where[name]), name)
pkg.__getattr__ = _lazy
"""
# A bare rtnetlink socket (nlm_request, bind, get) and the message classes, instead of
# IPRoute: get_links/get_addr/get_netnsid would become nlm_request calls.
PYROUTE2_SOCKET_ONLY = """
from pyroute2.netlink.rtnl.iprsocket import IPRSocket
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2 import netns
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, nla
from pyroute2.netlink.rtnl import RTM_GETNEIGHTBL, RTM_NEWNSID
from pyroute2.netlink.rtnl.ndtmsg import ndtmsg
from pyroute2.netlink.rtnl.nsidmsg import nsidmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
"""
ENGINE_IMPORTS = f"""
sys.path.insert(0, {ENGINE!r}); sys.modules['bcc'] = None  # fail loudly if bcc is imported
import bpftune.engine, bpftune.cli, bpftune.report, bpftune.query, bpftune.plugins
import pkgutil, importlib, bpftune.tuners
for m in pkgutil.iter_modules(bpftune.tuners.__path__):
    importlib.import_module('bpftune.tuners.' + m.name)
"""
BTF = f"""
sys.path.insert(0, {ENGINE!r}); sys.modules['bcc'] = None
import gc, ctypes
from bpftune.btf import Btf
btf = Btf.load()
loaded = dict(rss())
del btf; gc.collect(); ctypes.CDLL(None).malloc_trim(0)
EXTRA = {{'rss_with_btf_kib': loaded['VmRSS'], 'btf_load_s': round(time.monotonic() - t, 3)}}
"""

# Every pyroute2 name is a dummy class (attributes and iteration included): what bpftune
# costs without pyroute2, i.e. with its own small rtnetlink code instead.
STUB_PYROUTE2 = """
import importlib.abc, importlib.machinery, types
class _Meta(type):
    def __getattr__(cls, name): return _Meta(name, (), {})
    def __iter__(cls): return iter(())
class _Mod(types.ModuleType):
    def __getattr__(self, name): return _Meta(name, (), {})
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'pyroute2':
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec): return _Mod(spec.name)
    def exec_module(self, module): module.__path__ = []
sys.meta_path.insert(0, _Finder())
"""

SCENARIOS = {
    "bare interpreter": "",
    "parent: ctypes + libbpf.so.1 + socket + json": (
        "import ctypes, socket, json, os; sys.path.insert(0, '/work/proto13'); import libbpf"),
    "import bcc": "import bcc",
    "import bcc + one BPF() compile": (
        "import bcc; b = bcc.BPF(text=b'int f(void *c) { return 0; }'); "
        "b.load_func(b'f', bcc.BPF.SOCKET_FILTER)"),
    "import pyroute2 (full)": "import pyroute2",
    "pyroute2 parts bpftune uses (normal import)": PYROUTE2_USED,
    "pyroute2 parts bpftune uses (__init__ bypassed)": BYPASS_INIT + PYROUTE2_USED,
    "pyroute2 IPRSocket + messages only (__init__ bypassed)": BYPASS_INIT + PYROUTE2_SOCKET_ONLY,
    "bpftune engine + tuners (no bcc), pyroute2 normal": ENGINE_IMPORTS,
    "bpftune engine + tuners (no bcc), pyroute2 __init__ bypassed": BYPASS_INIT + ENGINE_IMPORTS,
    "bpftune engine + tuners (no bcc), pyroute2 stubbed out": STUB_PYROUTE2 + ENGINE_IMPORTS,
    "daemon projection: engine + tuners + libbpf.py (pyroute2 normal)": (
        ENGINE_IMPORTS + "\nsys.path.insert(0, '/work/proto13'); import libbpf"),
    "daemon projection: engine + tuners + libbpf.py (pyroute2 stubbed)": (
        STUB_PYROUTE2 + ENGINE_IMPORTS + "\nsys.path.insert(0, '/work/proto13'); import libbpf"),
    "bpftune Btf.load() then freed (gc + malloc_trim)": BTF,
}


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PRELUDE + code + REPORT],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    results = {}
    for name, code in SCENARIOS.items():
        runs = [run(code) for _ in range(3)]  # the median of three, by RSS
        ok = [r for r in runs if "error" not in r]
        results[name] = sorted(ok, key=lambda r: r["after_kib"])[len(ok) // 2] if ok else runs[0]
    bare = results["bare interpreter"].get("after_kib", 0)
    for name, r in results.items():
        if "error" in r:
            print(f"{name:62} ERROR {r['error']}")
            continue
        extra = "".join(f" {k}={v}" for k, v in r.items()
                        if k in ("rss_with_btf_kib", "btf_load_s"))
        print(f"{name:62} VmRSS {r['after_kib'] / 1024:6.1f} MiB (+{(r['after_kib'] - bare) / 1024:5.1f})"
              f" {r['import_s']:6.3f} s {r['modules']:4} modules{extra}")
    with open("/work/proto13/imports.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
