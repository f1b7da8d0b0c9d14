"""Reading and writing sysctls through /proc/sys, in whatever netns the calling thread is in."""

from __future__ import annotations

import errno

Value = tuple[int, ...] | str

PROC_SYS = "/proc/sys/"
INT_MAX = 2**31 - 1
LONG_MAX = 2**63 - 1


class SysctlError(OSError):
    pass


def path_of(name: str) -> str:
    return PROC_SYS + name.replace(".", "/")


def name_of(path: str) -> str:
    """``net/ipv4/tcp_rmem`` (as the kernel's cgroup/sysctl hook names it) -> dotted name."""
    return path.removeprefix(PROC_SYS).strip("/").replace("/", ".")


def read(name: str, *, string: bool = False) -> Value:
    try:
        with open(path_of(name)) as f:
            text = f.readline().strip()
    except OSError as e:
        raise SysctlError(e.errno, f"cannot read sysctl '{name}': {e.strerror}") from None
    if string:
        return text
    try:
        return tuple(int(v) for v in text.split())
    except ValueError:
        raise SysctlError(errno.EINVAL, f"sysctl '{name}' is not numeric: {text!r}") from None


def format_value(value: Value) -> str:
    return value if isinstance(value, str) else " ".join(str(v) for v in value)


def write(name: str, value: Value) -> None:
    try:
        with open(path_of(name), "w") as f:
            f.write(format_value(value))
    except OSError as e:
        raise SysctlError(e.errno, f"cannot write sysctl '{name}': {e.strerror}") from None
