"""Install and Remove on pcp as its package ships it (issue 8): the first PMDA Install on a
new machine makes pmdaproc.sh sort pmcd.conf; Remove must still leave pcp as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcp_helpers import PMCD_CONF, PMNS_ROOT, hup_pmcd, pcp_configuration, pmda_installed, pminfo

APT_CACHE = Path("/var/cache/apt/archives")


def _dpkg(*args: str) -> str:
    return subprocess.run(["dpkg-query", "-W", *args, "pcp"], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="session")
def pcp_package(tmp_path_factory) -> Path:
    """The installed pcp package's files, from its .deb (the apt cache's copy, or
    `apt-get download`), extracted with dpkg-deb."""
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        pytest.skip("not a Debian machine")
    version, arch = _dpkg("-f=${Version}"), _dpkg("-f=${Architecture}")
    work = tmp_path_factory.mktemp("pcp-deb")
    deb = APT_CACHE / f"pcp_{version.replace(':', '%3a')}_{arch}.deb"
    if not deb.is_file():
        with contextlib.suppress(LookupError):
            shutil.chown(work, "_apt")  # apt downloads as this user where it exists
        get = ["apt-get", "download", "-q", f"pcp={version}"]
        if subprocess.run(get, cwd=work, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
            subprocess.run(get, cwd=work, check=True, capture_output=True)
        deb = next(work.glob("pcp_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
    return work / "x"


@contextlib.contextmanager
def machine_pcp_kept(tmp: Path) -> Iterator[None]:
    """Put this machine's pmcd.conf and PMNS root back as they were (bytes, owner, mode
    and times), and let pmcd re-read them."""
    saved = {path: tmp / path.name for path in (PMCD_CONF, PMNS_ROOT)}
    for path, copy in saved.items():
        shutil.copy2(path, copy)
    try:
        yield
    finally:
        for path, copy in saved.items():
            shutil.copyfile(copy, path)  # same inode, owner and mode
            shutil.copystat(copy, path)
        hup_pmcd()


def test_install_remove_leave_pcp_as_the_package_shipped_it(pcp_package, tmp_path):
    shipped = pcp_package / "etc/pcp/pmcd/pmcd.conf"
    # The package ships no PMNS root: pmcd's first start makes it (Rebuild, from the
    # root_* files of the PMDAs in pmcd.conf). Make it the same way, beside.
    pmns = tmp_path / "pmns"
    shutil.copytree(pcp_package / "var/lib/pcp/pmns", pmns, symlinks=True)
    subprocess.run(["./Rebuild", "-s", "-u"], cwd=pmns, check=True, timeout=120,
                   env=dict(os.environ, PCP_PMCDCONF_PATH=str(shipped)))
    with machine_pcp_kept(tmp_path):
        shutil.copyfile(shipped, PMCD_CONF)
        shutil.copyfile(pmns / "root", PMNS_ROOT)
        hup_pmcd()
        fresh = pcp_configuration()
        assert ("bpftune",) not in {agent[:1] for agent in fresh[0][0]}
        with pmda_installed():  # fails if Remove leaves an agent, access rule or name changed
            assert "bpftune.daemon.up" in pminfo("bpftune").split()
            assert PMCD_CONF.read_bytes() != shipped.read_bytes()  # pmdaproc.sh sorted it
        assert pcp_configuration() == fresh
        # and our Remove put PCP's own layout back, since nothing else changed meanwhile
        assert PMCD_CONF.read_text() == shipped.read_text()
