"""Packaging: `make rpm` builds an SRPM and three noarch RPMs that hold everything the
checkout and a fresh `bpftune-render` provide. Nothing here touches the live system: the
packages are only queried and unpacked into temporary directories."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO

RPM_DIR = REPO / "build/rpm"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PACKAGES = ("bpftune", "bpftune-pcp-pmda", "bpftune-grafana")
PMDA_DIR = "/var/lib/pcp/pmdas/bpftune"
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Build:
    log: str
    seconds: float
    srpm: Path
    rpms: dict[str, Path]


def run(*cmd: str, **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def rpm_query(path: Path, *args: str) -> str:
    return run("rpm", "-qp", *args, str(path))


@pytest.fixture(scope="module")
def build() -> Build:
    for d in ("RPMS", "SRPMS"):
        shutil.rmtree(RPM_DIR / d, ignore_errors=True)
    start = time.monotonic()
    r = subprocess.run(["make", "-C", str(REPO), "rpm"], capture_output=True, text=True,
                       timeout=300)
    seconds = time.monotonic() - start
    assert r.returncode == 0, f"make rpm failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    srpm = RPM_DIR / f"SRPMS/bpftune-{VERSION}-1.src.rpm"
    rpms = {p: RPM_DIR / f"RPMS/noarch/{p}-{VERSION}-1.noarch.rpm" for p in PACKAGES}
    return Build(r.stdout + r.stderr, seconds, srpm, rpms)


def render(what: str, out: Path) -> dict[Path, bytes]:
    """A fresh `bpftune-render WHAT OUT` from the checkout: relative path -> content."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "engine"))
    run(sys.executable, "-m", "bpftune.render", what, str(out), env=env)
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def installed_path(what: str, rel: Path) -> str:
    """Where the spec installs a rendered file."""
    if what == "grafana":
        base = "/etc/grafana" if rel.parts[0] == "provisioning" else "/usr/share/bpftune/grafana"
    else:
        base = "/usr/share/bpftune" if rel.parts[0] == "pmlogger" else "/var/lib/pcp/config"
    return f"{base}/{rel}"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, dict[Path, bytes]]:
    tmp = tmp_path_factory.mktemp("render")
    return {what: render(what, tmp / what) for what in ("grafana", "pcp")}


def unpack(rpm: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run(f"rpm2cpio '{rpm}' | cpio -idm --quiet", shell=True, cwd=dest, check=True)
    return dest


def test_make_rpm_builds_srpm_and_three_noarch_rpms_quickly(build):
    assert build.srpm.is_file()
    assert {p: path.is_file() for p, path in build.rpms.items()} == dict.fromkeys(PACKAGES, True)
    assert build.seconds < 120
    sources = sorted(rpm_query(build.srpm, "-l").split())
    assert sources == sorted(["bpftune.spec", f"bpftune-{VERSION}.tar.gz"])


def test_nothing_installed_is_left_out_of_the_packages(build):
    # rpmbuild stops on installed but unpackaged files; make sure it looked.
    assert "Checking for unpackaged file(s)" in build.log
    assert "unpackaged file(s) found" not in build.log


def test_daemon_package_has_the_executables_python_package_bpf_unit_and_man_pages(build):
    files = set(rpm_query(build.rpms["bpftune"], "-l").split())
    for f in ("/usr/sbin/bpftune", "/usr/bin/bpftune-render",
              "/usr/lib/systemd/system/bpftune.service"):
        assert f in files
    inits = [f for f in files if f.endswith("/bpftune/__init__.py")]
    assert len(inits) == 1
    sitelib = inits[0].removesuffix("/bpftune/__init__.py")
    # Where the system Python imports from (Debian: /usr/lib/python3/dist-packages).
    assert sitelib in run(SYSTEM_PYTHON, "-c", "import sys; print(*sys.path)").split()
    for module in (REPO / "engine").rglob("*.py"):
        assert f"{sitelib}/{module.relative_to(REPO / 'engine')}" in files
    for source in [*REPO.glob("bpf/*.bpf.c"), *REPO.glob("bpf/*.bpf.h")]:
        assert f"/usr/share/bpftune/bpf/{source.name}" in files
    for template in [*REPO.glob("grafana/*.j2"), *REPO.glob("pmlogger/*.j2")]:
        assert f"/usr/share/bpftune/{template.relative_to(REPO)}" in files
    for page in REPO.glob("docs/*.8.rst"):
        name = f"/usr/share/man/man8/{page.name.removesuffix('.rst')}"
        assert any(f == name or f.startswith(name + ".") for f in files), name
    assert any(f.startswith("/usr/share/licenses/") and f.endswith("/LICENSE") for f in files)


def test_pmda_and_grafana_packages_hold_every_rendered_file(build, fresh):
    pmda = set(rpm_query(build.rpms["bpftune-pcp-pmda"], "-l").split())
    for name in ("pmdabpftune.python", "Install", "Remove", "python.sh"):
        assert f"{PMDA_DIR}/{name}" in pmda
    grafana = set(rpm_query(build.rpms["bpftune-grafana"], "-l").split())
    for what, files in (("pcp", pmda), ("grafana", grafana)):
        assert fresh[what]
        for rel in fresh[what]:
            assert installed_path(what, rel) in files


def test_requires(build):
    def requires(p: str) -> set[str]:
        return {line.split()[0] for line in rpm_query(build.rpms[p], "--requires").splitlines()}

    assert {"python3-bcc", "libbpf", "python3-pyroute2", "python3-jinja2"} <= requires("bpftune")
    assert {"bpftune", "pcp", "python3-pcp"} <= requires("bpftune-pcp-pmda")


def test_audit_trail_directory_and_journald_binding(build):
    modes = rpm_query(build.rpms["bpftune"], "--qf", "[%{FILENAMES} %{FILEMODES:perms}\n]")
    assert "/var/log/bpftune drwxr-xr-x" in modes.splitlines()
    assert "python3-systemd" in rpm_query(build.rpms["bpftune"], "--recommends").split()


def test_scriptlets_enable_the_service_and_follow_pcp_conventions(build):
    daemon = rpm_query(build.rpms["bpftune"], "--scripts")
    for kind in ("postinstall", "preuninstall", "postuninstall"):
        assert f"{kind} scriptlet" in daemon
    assert daemon.count("bpftune.service") >= 3
    pmda = rpm_query(build.rpms["bpftune-pcp-pmda"], "--scripts")
    assert f"touch {PMDA_DIR}/.NeedInstall" in pmda
    assert "domain.h" in pmda and "./Remove" in pmda
    assert "pmns.python" in pmda and "domain.h.python" in pmda
    for path in build.rpms.values():
        for tag in ("PREIN", "POSTIN", "PREUN", "POSTUN"):
            script = rpm_query(path, "--qf", f"%{{{tag}}}")
            if script != "(none)":
                subprocess.run(["sh", "-n", "-c", script], check=True)


def test_grafana_provisioning_is_config_noreplace(build):
    flags = rpm_query(build.rpms["bpftune-grafana"], "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]")
    yaml = [line.split() for line in flags.splitlines() if line.startswith("/etc/grafana/")]
    assert len(yaml) == 2
    assert all("c" in f and "n" in f for _, f in yaml)


def test_packaged_files_equal_a_fresh_render(build, fresh, tmp_path):
    pmda = unpack(build.rpms["bpftune-pcp-pmda"], tmp_path / "pmda")
    grafana = unpack(build.rpms["bpftune-grafana"], tmp_path / "grafana")
    dashboards = {p.relative_to(grafana) for p in grafana.rglob("*.json")}
    assert dashboards == {Path(installed_path("grafana", rel)).relative_to("/")
                          for rel in fresh["grafana"] if rel.suffix == ".json"}
    for what, root in (("grafana", grafana), ("pcp", pmda)):
        for rel, content in fresh[what].items():
            packaged = root / installed_path(what, rel).lstrip("/")
            assert packaged.read_bytes() == content, f"{packaged} differs from a fresh render"


def test_launchers_run_the_package_as_a_process_named_bpftune(build, tmp_path):
    root = unpack(build.rpms["bpftune"], tmp_path / "root")
    bpftune, render_cmd = root / "usr/sbin/bpftune", root / "usr/bin/bpftune-render"
    assert os.access(bpftune, os.X_OK) and os.access(render_cmd, os.X_OK)
    assert bpftune.read_text().startswith(f"#!{SYSTEM_PYTHON} ")
    (sitelib,) = {p.parent.parent for p in root.rglob("bpftune/__init__.py")}
    env = dict(os.environ, PYTHONPATH=str(sitelib))
    assert run(str(bpftune), "-V", env=env) == f"bpftune v{VERSION}\n"
    assert "grafana" in run(str(render_cmd), "--help", env=env)
    # The process name comes from the launcher's file name (what ps, pgrep and systemd see).
    stub = tmp_path / "stub/bpftune"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "cli.py").write_text("def main():\n    print(open('/proc/self/comm').read().strip())\n")
    assert run(str(bpftune), env=dict(os.environ, PYTHONPATH=str(stub.parent))) == "bpftune\n"


def test_unit_verifies(build, tmp_path):
    root = unpack(build.rpms["bpftune"], tmp_path / "root")
    unit = root / "usr/lib/systemd/system/bpftune.service"
    assert unit.read_bytes() == (REPO / "packaging/bpftune.service").read_bytes()
    # verify checks that ExecStart exists: show it the packaged /usr/sbin through an overlay,
    # in a private mount namespace (the host's /usr/sbin is untouched).
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    shutil.copy2(root / "usr/sbin/bpftune", upper / "bpftune")
    script = (f"mount --make-rprivate / && mount -t overlay overlay "
              f"-o lowerdir=/usr/sbin,upperdir={upper},workdir={work} /usr/sbin && "
              f"systemd-analyze verify --man=no {unit}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
