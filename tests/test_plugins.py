"""Third-party tuners load from a plugin directory only when it and they are trusted."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile

import pytest

from helpers import daemon

PLUGIN = '''
from bpftune.tuner import Scenario, Tuner


class DemoTuner(Tuner):
    name = "demo"
    scenarios = (Scenario("demo", "a plugin tuner with no BPF program"),)
'''


@pytest.fixture
def plugin_dir():
    d = tempfile.mkdtemp(prefix="bpftune-plugins-", dir="/run")
    os.chmod(d, 0o755)
    path = os.path.join(d, "demo_tuner.py")
    with open(path, "w") as f:
        f.write(PLUGIN)
    os.chmod(path, 0o644)
    yield d
    shutil.rmtree(d)


def test_trusted_plugin_is_loaded(tmp_path, plugin_dir):
    with daemon(tmp_path, "-l", plugin_dir) as d:
        d.wait_for(r"active tuners: netns, sysctl, tcp_buffer, demo")


def posix_acl(uid: int) -> bytes:
    """An ACL xattr value that keeps the mode bits as they are (user::rwx user:uid:r-x
    group::r-x mask::r-x other::r-x), so only the ACL check can refuse it."""
    entries = [(0x01, 7, 0xFFFFFFFF), (0x02, 5, uid), (0x04, 5, 0xFFFFFFFF),
               (0x10, 5, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.mark.parametrize(("make_untrusted", "reason"), [
    (lambda d, f: os.chmod(d, 0o777), "untrusted plugin directory '{d}' (mode 777, uid 0)"),
    (lambda d, f: os.chmod(f, 0o664), "untrusted plugin '{f}' (mode 664, uid 0)"),
    (lambda d, f: os.chown(f, 65534, -1), "untrusted plugin '{f}' (mode 644, uid 65534)"),
    (lambda d, f: (os.rename(f, f + ".real"), os.symlink(f + ".real", f)),
     "cannot inspect plugin '{f}': Too many levels of symbolic links"),
    (lambda d, f: os.setxattr(f, "system.posix_acl_access", posix_acl(65534)),
     "plugin '{f}' has an access ACL"),
    (lambda d, f: os.setxattr(d, "system.posix_acl_default", posix_acl(65534)),
     "plugin directory '{d}' has a default ACL"),
])
def test_untrusted_plugin_is_refused(tmp_path, plugin_dir, make_untrusted, reason):
    plugin = os.path.join(plugin_dir, "demo_tuner.py")
    make_untrusted(plugin_dir, plugin)
    with daemon(tmp_path, "-l", plugin_dir) as d:
        d.wait_for(r"active tuners: netns, sysctl, tcp_buffer$|tcp_buffer\n")
    assert reason.format(d=plugin_dir, f=plugin) in d.log
    assert f"refusing untrusted plugin '{plugin}'" in d.log
    assert "demo" not in d.log.split("active tuners:")[1]


def test_a_tuner_that_fails_to_load_does_not_stop_the_others(tmp_path, plugin_dir):
    with open(os.path.join(plugin_dir, "broken_tuner.py"), "w") as f:
        f.write(PLUGIN.replace('"demo"', '"broken"').replace("DemoTuner", "BrokenTuner")
                + '    bpf_source = "broken.bpf.c"\n')
    with open(os.path.join(plugin_dir, "broken.bpf.c"), "w") as f:
        f.write("this is not C;\n")
    with daemon(tmp_path, "-l", plugin_dir) as d:
        d.wait_for(r"active tuners: netns, sysctl, tcp_buffer, demo")
    assert "error initializing 'broken': cannot load BPF program broken.bpf.c" in d.log
