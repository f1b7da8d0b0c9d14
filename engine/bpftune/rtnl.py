"""rtnetlink with pyroute2, importing only the parts of it bpftune uses.

pyroute2 encodes and decodes every message (its message classes, its netlink socket). What
this module avoids is pyroute2's package ``__init__``, which Python runs before any
submodule and which imports all of pyroute2: in 0.7 every entry point of the ``pyroute2``
group (IPDB, NDB, IPSet, conntrack, ...), in 0.9 the same as plain imports. With it, the
daemon's imports (engine and tuners) are 36.9 MiB and 453 modules; with only these parts,
19.5 MiB and 193 modules (17.8 MiB without pyroute2 at all). pyroute2 has no switch to skip
its ``__init__``, so before the parts are imported the package is registered in
``sys.modules`` bare: its real spec and path, its ``__init__`` not run. Safeguards:

- pyroute2 imported already (fully, or bare by us): it is used as it is.
- A name only the package's ``__init__`` defines, asked for anywhere in the process
  (``from pyroute2 import IPRoute`` in a test or a plugin): the ``__init__`` runs then, and
  the package is what a normal import makes.
- A pyroute2 whose parts cannot be imported without their package's ``__init__``: those parts
  are dropped and pyroute2 is imported the normal way.

``IPRoute`` is not used: it pulls in request filters and tc plugins (+8 MiB), and its
``nlm_request`` fails in pyroute2 0.9 (KeyError 'nlm_generator'). The generic
``NetlinkSocket`` with the message classes registered works the same from 0.7 to 0.9.
"""

from __future__ import annotations

import importlib
import importlib.util
import socket
import sys
import threading
import types
from collections.abc import Iterable
from importlib.machinery import ModuleSpec

#: The pyroute2 modules imported below, imported first with the bare package.
PARTS = ("pyroute2.netlink", "pyroute2.netlink.exceptions", "pyroute2.netlink.nlsocket",
         "pyroute2.netlink.rtnl", "pyroute2.netlink.rtnl.ifaddrmsg",
         "pyroute2.netlink.rtnl.ndtmsg", "pyroute2.netlink.rtnl.nsidmsg",
         "pyroute2.netlink.rtnl.rtmsg", "pyroute2.netns")
#: The dunder names the package's ``__init__`` defines (others, such as ``__wrapped__``
#: probes, must not run it).
_INIT_DUNDERS = ("__all__", "__version__")
_complete_lock = threading.Lock()


def _complete(package: types.ModuleType, spec: ModuleSpec, name: str) -> object:
    """The package's ``__getattr__`` while it is bare: a submodule is imported; any other
    name runs the package's ``__init__`` first (once), as a normal import would have."""
    if name.startswith("__"):
        if name not in _INIT_DUNDERS:
            raise AttributeError(name)
    else:
        try:  # `from pyroute2 import config` inside pyroute2 asks the package first
            return importlib.import_module(f"{package.__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package.__name__}.{name}":
                raise
    with _complete_lock:
        if vars(package).pop("__getattr__", None) is not None:
            spec.loader.exec_module(package)
    return getattr(package, name)


def _register_bare_package() -> bool:
    """Put pyroute2 in ``sys.modules`` without running its ``__init__``; False if it is
    there already or not installed (a normal import then does what it always does)."""
    if "pyroute2" in sys.modules:
        return False
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    package = importlib.util.module_from_spec(spec)
    package.__getattr__ = lambda name: _complete(package, spec, name)
    sys.modules["pyroute2"] = package
    return True


def _import_parts() -> None:
    if not _register_bare_package():
        return
    try:
        for name in PARTS:
            importlib.import_module(name)
    except Exception:  # these parts need their package's __init__ here: run it after all
        for name in [m for m in sys.modules if m == "pyroute2" or m.startswith("pyroute2.")]:
            del sys.modules[name]
        importlib.import_module("pyroute2")


_import_parts()

# The parts, from sys.modules now however they were imported.
from pyroute2.netlink import (  # noqa: E402
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    nla,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
from pyroute2.netlink.nlsocket import NetlinkSocket  # noqa: E402
from pyroute2.netlink.rtnl import (  # noqa: E402
    RTM_DELNSID,
    RTM_GETADDR,
    RTM_GETNEIGHTBL,
    RTM_GETNSID,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWNEIGHTBL,
    RTM_NEWNSID,
    RTM_NEWROUTE,
    RTM_SETNEIGHTBL,
    RTNLGRP_NSID,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # noqa: E402
from pyroute2.netlink.rtnl.ndtmsg import ndtmsg  # noqa: E402
from pyroute2.netlink.rtnl.nsidmsg import nsidmsg  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402
from pyroute2.netns import listnetns, setns  # noqa: E402

__all__ = ["NLM_F_ACK", "NLM_F_DUMP", "NLM_F_REQUEST", "RTM_DELNSID", "RTM_GETADDR",
           "RTM_GETNEIGHTBL", "RTM_GETNSID", "RTM_NEWNEIGHTBL", "RTM_NEWNSID", "RTM_SETNEIGHTBL",
           "RTNLGRP_NSID", "NetlinkError", "NetlinkSocket", "ifaddrmsg", "listnetns", "ndtmsg",
           "nla", "nsidmsg", "open_socket", "replies", "request", "route_to", "setns"]

#: How replies and events are decoded: the message classes of the types bpftune receives.
POLICY: dict[int, type[nlmsg]] = {RTM_NEWADDR: ifaddrmsg, RTM_NEWNEIGHTBL: ndtmsg,
                                  RTM_NEWNSID: nsidmsg, RTM_DELNSID: nsidmsg,
                                  RTM_NEWROUTE: rtmsg}


def open_socket(policy: dict[int, type[nlmsg]] | None = None) -> NetlinkSocket:
    """An rtnetlink socket that decodes with ``POLICY``, updated by ``policy``."""
    sock = NetlinkSocket(NETLINK_ROUTE)
    sock.register_policy({**POLICY, **(policy or {})})
    return sock


def request(msg: nlmsg, msg_type: int, flags: int = NLM_F_REQUEST,
            policy: dict[int, type[nlmsg]] | None = None) -> list[nlmsg]:
    """Send ``msg`` on a socket of its own; the replies (NetlinkError if the kernel refuses)."""
    with open_socket(policy) as sock:
        return replies(sock, msg, msg_type, flags)


def replies(sock: NetlinkSocket, msg: nlmsg, msg_type: int,
            flags: int = NLM_F_REQUEST) -> list[nlmsg]:
    """Send ``msg`` on ``sock``; the replies (pyroute2 0.9 yields them, 0.7 returns them)."""
    result: Iterable[nlmsg] = sock.nlm_request(msg, msg_type, flags)
    return list(result)


def route_to(address: str, family: int) -> tuple[str | None, int | None]:
    """The gateway (None on-link) and output interface index of the route this namespace
    takes to ``address``."""
    msg = rtmsg()
    msg["family"] = family
    msg["dst_len"] = 32 if family == socket.AF_INET else 128
    msg["attrs"] = [("RTA_DST", address)]
    route = request(msg, RTM_GETROUTE)[0]
    return route.get_attr("RTA_GATEWAY"), route.get_attr("RTA_OIF")
