"""bpftune.rtnl: the daemon imports only the parts of pyroute2 it uses (pyroute2's package
__init__ imports all of it: +19 MiB of a 40 MiB budget), while pyroute2 stays whole for
anything else in the process that asks for it."""

from __future__ import annotations

import subprocess
import sys

PYROUTE2_MODULES = "len([m for m in sys.modules if m.split('.')[0] == 'pyroute2'])"
# A pyroute2 whose parts cannot be imported while the package is bare, as a future
# version's might not be.
NEEDS_INIT = """
import importlib.abc
class NeedsInit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if (name == 'pyroute2.netlink.rtnl.ndtmsg'
                and '__getattr__' in vars(sys.modules['pyroute2'])):
            raise ImportError('needs the package __init__')
sys.meta_path.insert(0, NeedsInit())
"""


def run(code: str) -> str:
    """What ``code`` prints in a fresh interpreter (what is imported is the point)."""
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['bcc'] = None\n" + code],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def test_the_daemons_imports_leave_out_the_rest_of_pyroute2():
    out = run(f"""
import bpftune.engine, bpftune.plugins
bpftune.plugins.builtin_tuners()
print({PYROUTE2_MODULES}, 'pyroute2.iproute' in sys.modules, 'pyroute2.ipdb' in sys.modules)
""")
    count, iproute, ipdb = out.split()
    assert (iproute, ipdb) == ("False", "False")
    assert int(count) <= 25, out  # 12 with pyroute2 0.7, 20 with 0.9; all of it: over 160


def test_pyroute2_is_whole_for_whoever_asks_for_it_afterwards():
    out = run("""
from bpftune import rtnl
from pyroute2 import IPRoute
with IPRoute() as ipr:
    name = ipr.get_links(1)[0].get_attr('IFLA_IFNAME')
same = rtnl.NetlinkSocket is sys.modules['pyroute2.netlink.nlsocket'].NetlinkSocket
print(name, IPRoute.__module__, same)
""")
    assert out == "lo pyroute2.iproute.linux True"


def test_a_pyroute2_imported_before_is_used_as_it_is():
    out = run("""
import pyroute2
from bpftune import rtnl
print(rtnl.NetlinkSocket is pyroute2.netlink.nlsocket.NetlinkSocket, 'IPRoute' in vars(pyroute2))
""")
    assert out == "True True"


def test_parts_that_need_the_package_init_are_imported_the_normal_way():
    out = run(NEEDS_INIT + """
import socket
from bpftune import neigh
print(neigh.device_prefixes(1, 'lo', socket.AF_INET), 'IPRoute' in vars(sys.modules['pyroute2']))
""")
    assert out == "[8] True"
