"""Memory figures that ceilings are computed from."""

from __future__ import annotations

import os
from functools import cache


@cache
def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


@cache
def total_ram_pages() -> int:
    # Upstream derives ceilings from an nr_free_buffer_pages estimate read from
    # /proc/zoneinfo, which on VMs with hot-added memory is a fraction of RAM (here 1/6) and
    # below the kernel's own boot-time tcp_mem; total RAM is the stable basis.
    return os.sysconf("SC_PHYS_PAGES")


def total_ram_bytes() -> int:
    return total_ram_pages() * page_size()
