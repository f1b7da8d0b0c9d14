"""Where bpftune keeps its run-time and persistent files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

RUN_DIR = "/run/bpftune"
PID_FILE = f"{RUN_DIR}/bpftune.pid"
DEFAULT_CGROUP = f"{RUN_DIR}/cgroupv2"
QUERY_SOCKET = os.environ.get("BPFTUNE_QUERY_SOCKET", f"{RUN_DIR}/query.sock")
STATE_DIR = os.environ.get("BPFTUNE_STATE_DIR", "/var/lib/bpftune")
#: The audit trail (bpftune.audit); --audit-file overrides, and so does $BPFTUNE_AUDIT_FILE.
AUDIT_FILE = os.environ.get("BPFTUNE_AUDIT_FILE", "/var/log/bpftune/audit.jsonl")


def data_dir(name: str, marker: str) -> Path:
    """A data directory (``bpf``, ``grafana``, ``pcp``) from a checkout, an installed wheel
    or a package, identified by a file it must contain; $BPFTUNE_<NAME>_DIR overrides."""
    candidates = [
        os.environ.get(f"BPFTUNE_{name.upper()}_DIR"),
        Path(__file__).resolve().parents[2] / name,
        Path(sys.prefix) / "share/bpftune" / name,
        Path("/usr/share/bpftune") / name,
        Path("/usr/local/share/bpftune") / name,
    ]
    for c in candidates:
        if c and (Path(c) / marker).is_file():
            return Path(c)
    raise FileNotFoundError(f"cannot find bpftune's {name} files ({marker}); "
                            f"set BPFTUNE_{name.upper()}_DIR")
