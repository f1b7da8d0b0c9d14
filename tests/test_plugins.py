"""Third-party tuners load from a plugin directory only when it and they are trusted, and so
do the BPF sources they bring."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import time

import pytest

from helpers import ACTIVE_HERE, daemon

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
        d.wait_for(rf"active tuners: {ACTIVE_HERE}, demo")


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
        d.wait_for(rf"active tuners: {ACTIVE_HERE}$|active tuners: {ACTIVE_HERE}\n")
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
        d.wait_for(rf"active tuners: {ACTIVE_HERE}, demo")
    assert "error initializing 'broken': cannot load BPF program broken.bpf.c" in d.log


BPF_PLUGIN = '''
from bpftune.log import log
from bpftune.tuner import Scenario, Tuner


class BpfDemoTuner(Tuner):
    name = "bpfdemo"
    bpf_source = {bpf_source!r}
    scenarios = (Scenario("exec", "a program was started"),)
    seen = False

    def handle(self, event):
        if not self.seen:
            self.seen = True
            log.notice(f"bpfdemo: event from its BPF program (pid {{event.pid}})")
'''
BPF_SOURCE = """#include "bpftune.bpf.h"

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
	struct bpftune_event ev = {};

	if (rate_limited(0, 0))
		return 0;
	ev.tuner_id = TUNER_ID;
	ev.pid = bpf_get_current_pid_tgid() >> 32;
	submit_event(&ev);
	return 0;
}
"""


def write(path: str, text: str, mode: int = 0o644) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


@pytest.fixture
def bpf_plugin_dir():
    """/run/bpftune-plugins-XXX/lib with the demo plugin (no BPF) and the bpfdemo plugin
    with its BPF source; a valid, trusted evil.bpf.c one level up."""
    top = tempfile.mkdtemp(prefix="bpftune-plugins-", dir="/run")
    os.chmod(top, 0o755)
    d = os.path.join(top, "lib")
    os.mkdir(d)
    os.chmod(d, 0o755)
    write(os.path.join(d, "demo_tuner.py"), PLUGIN)
    write(os.path.join(top, "evil.bpf.c"), BPF_SOURCE)
    write(os.path.join(d, "bpfdemo.bpf.c"), BPF_SOURCE)
    yield d
    shutil.rmtree(top)


def write_bpf_plugin(d: str, bpf_source: str = "bpfdemo.bpf.c") -> str:
    return write(os.path.join(d, "bpfdemo_tuner.py"), BPF_PLUGIN.format(bpf_source=bpf_source))


def test_plugin_with_trusted_bpf_source_is_loaded(tmp_path, bpf_plugin_dir):
    write_bpf_plugin(bpf_plugin_dir)
    with daemon(tmp_path, "-l", bpf_plugin_dir) as d:
        d.wait_for(rf"active tuners: {ACTIVE_HERE}, bpfdemo, demo")
        subprocess.run(["true"], check=True)  # an exec for its program to report
        d.wait_for(r"bpfdemo: event from its BPF program \(pid \d+\)")


def symlink_to_copy(c: str) -> None:
    os.rename(c, c + ".real")
    os.symlink(c + ".real", c)


@pytest.mark.parametrize(("bpf_source", "make_untrusted", "reason"), [
    ("bpfdemo.bpf.c", lambda c: os.chmod(c, 0o666),
     "untrusted plugin BPF source '{c}' (mode 666, uid 0)"),
    ("bpfdemo.bpf.c", lambda c: os.chmod(c, 0o664),
     "untrusted plugin BPF source '{c}' (mode 664, uid 0)"),
    ("bpfdemo.bpf.c", lambda c: os.chown(c, 65534, -1),
     "untrusted plugin BPF source '{c}' (mode 644, uid 65534)"),
    ("bpfdemo.bpf.c", symlink_to_copy,
     "cannot inspect plugin BPF source '{c}': Too many levels of symbolic links"),
    ("bpfdemo.bpf.c", lambda c: os.setxattr(c, "system.posix_acl_access", posix_acl(65534)),
     "plugin BPF source '{c}' has an access ACL"),
    ("../evil.bpf.c", None,
     "plugin BPF source '../evil.bpf.c' of '{py}' is not a file name in the plugin's "
     "directory"),
    ("{top}/evil.bpf.c", None,
     "plugin BPF source '{top}/evil.bpf.c' of '{py}' is not a file name in the plugin's "
     "directory"),
], ids=["world-writable", "group-writable", "not-root", "symlink", "acl", "dotdot", "absolute"])
def test_plugin_with_untrusted_bpf_source_is_refused(tmp_path, bpf_plugin_dir, bpf_source,
                                                     make_untrusted, reason):
    top = os.path.dirname(bpf_plugin_dir)
    bpf_source = bpf_source.format(top=top)
    plugin = write_bpf_plugin(bpf_plugin_dir, bpf_source)
    source = os.path.join(bpf_plugin_dir, "bpfdemo.bpf.c")
    if make_untrusted:
        make_untrusted(source)
    with daemon(tmp_path, "-l", bpf_plugin_dir) as d:
        d.wait_for(rf"active tuners: {ACTIVE_HERE}, demo\n")
        subprocess.run(["true"], check=True)
        time.sleep(1)
    assert reason.format(c=source, py=plugin, top=top) in d.log
    assert f"refusing untrusted plugin '{plugin}'" in d.log
    assert "bpfdemo" not in d.log.split("active tuners:")[1]
    assert "event from its BPF program" not in d.log
