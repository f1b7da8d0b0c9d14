"""Where bpftune keeps its run-time and persistent files."""

from __future__ import annotations

import os

RUN_DIR = "/run/bpftune"
PID_FILE = f"{RUN_DIR}/bpftune.pid"
DEFAULT_CGROUP = f"{RUN_DIR}/cgroupv2"
QUERY_SOCKET = os.environ.get("BPFTUNE_QUERY_SOCKET", f"{RUN_DIR}/query.sock")
STATE_DIR = os.environ.get("BPFTUNE_STATE_DIR", "/var/lib/bpftune")
