from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid

import pytest

from helpers import Hosts, Sysctls, managed_sysctls, read_sysctl

# Set before anything imports bpftune.paths: daemons the tests start (and engines made in
# this process) write their audit trail here, never to /var/log/bpftune. Tests of the trail
# give each daemon its own --audit-file.
AUDIT_DIR = tempfile.mkdtemp(prefix="bpftune-test-audit-")
os.environ["BPFTUNE_AUDIT_FILE"] = os.path.join(AUDIT_DIR, "audit.jsonl")


@pytest.fixture(scope="session", autouse=True)
def _root() -> None:
    # CI runs as root; the setup script is run as root too. A non-root run is a mistake.
    assert os.geteuid() == 0, "the bpftune test suite must run as root"


@pytest.fixture
def sysctls():
    s = Sysctls()
    yield s
    s.restore()


@pytest.fixture
def hosts():
    h = Hosts(ns=f"bpftune-test-{uuid.uuid4().hex[:8]}")
    try:
        h.create()
        yield h
    finally:  # also when create() failed half-way: no namespace or veth is left behind
        h.destroy()


@pytest.fixture(scope="session")
def carried_state(tmp_path_factory):
    """One state directory for every test that asks for it, in the order they run: each
    daemon starts from the ledger the previous one left (as /var/lib/bpftune/ carries over
    between runs on a real host)."""
    return tmp_path_factory.mktemp("carried") / "state"


@pytest.fixture(scope="session", autouse=True)
def _audit_dir_removed():
    """Remove the tests' audit trail directory (see AUDIT_DIR) at the end."""
    yield
    shutil.rmtree(AUDIT_DIR, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _machine_left_as_found():
    """Fail the run if any test leaves a sysctl bpftune manages changed (and put it back)."""
    names = [n for n in managed_sysctls() if os.path.exists("/proc/sys/" + n.replace(".", "/"))]
    before = {n: read_sysctl(n) for n in names}
    yield
    leaked = {n: (v, read_sysctl(n)) for n, v in before.items() if read_sysctl(n) != v}
    restore = Sysctls(saved={(n, None): v for n, (v, _) in leaked.items()})
    restore.restore()
    assert not leaked, f"tests left sysctls changed (now restored): {leaked}"


@pytest.fixture(scope="module")
def tuned_pmda(tmp_path_factory):
    """The PMDA installed in pmcd and a daemon that tuned tcp_rmem/tcp_wmem in the global
    namespace and in a test namespace. Yields (daemon, hosts)."""
    from helpers import daemon, transfer_both_ways
    from pcp_helpers import pmda_installed
    from test_tcp_buffer import squeeze_buffers

    tmp = tmp_path_factory.mktemp("tuned")
    saved, hosts = Sysctls(), Hosts(ns=f"bpftune-pcp-{uuid.uuid4().hex[:6]}")
    hosts.create()
    try:
        for ns in (None, hosts.ns):
            squeeze_buffers(saved, ns)
        with pmda_installed(), daemon(tmp) as d:
            transfer_both_ways(hosts, port=5297)
            time.sleep(2)  # the PMDA polls the daemon once a second
            yield d, hosts
    finally:
        hosts.destroy()
        saved.restore()


@pytest.fixture
def ns_changes(tmp_path, hosts, sysctls):
    """The real change path (no daemon) with a test namespace whose tcp_rmem max is small:
    (changes, a tcp_buffer stand-in, the namespace's cookie, its name, the state dir)."""
    from types import SimpleNamespace

    from bpftune.changes import Changes, StateFile
    from bpftune.netns import Namespaces
    from bpftune.tuners.tcp_buffer import TcpBufferTuner
    from helpers import netns_cookie

    sysctls.set(TcpBufferTuner.RMEM.name, "4096 131072 131072", hosts.ns)
    namespaces = Namespaces()
    namespaces.scan()
    changes = Changes(namespaces, StateFile(str(tmp_path)))
    tuner = SimpleNamespace(name="tcp_buffer", scenarios=TcpBufferTuner.scenarios)
    yield changes, tuner, netns_cookie(hosts.ns), hosts.ns, tmp_path
    namespaces.close()
