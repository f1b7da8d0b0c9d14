"""Finding tuners: the built-in ``bpftune.tuners`` package and trusted plugin files.

Plugins are Python files named ``<name>_tuner.py``. They run as root inside the daemon, so
they get upstream's trust rules: every directory from ``/`` down and the file itself must be
owned by root, not group- or world-writable, not a symlink and without POSIX ACLs. The file is
read from the descriptor that was checked, so it cannot be swapped in between.

Every other file a plugin brings gets the same checks: today that is its BPF source
(``Tuner.bpf_source``), compiled and loaded into the kernel as root. It must be a plain file
name in the plugin's own directory (no ``/``, ``..``), passes the checks when the plugin is
loaded, and its checked text is what the engine compiles (:func:`bpf_text`); a plugin whose
BPF source fails is refused as a whole.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import os
import pkgutil
import stat
import types
from pathlib import Path

from bpftune import tuners as builtin_package
from bpftune.log import log
from bpftune.tuner import Tuner

PLUGIN_SUFFIX = "_tuner.py"
DEFAULT_PLUGIN_DIR = "/usr/local/lib/bpftune"
_ACL_XATTRS = (("system.posix_acl_access", "an access ACL"),
               ("system.posix_acl_default", "a default ACL"))
_NO_ACL = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)


class UntrustedPlugin(Exception):
    pass


# The checked BPF source of each plugin tuner class: (bpf_source as checked, its text).
_plugin_sources: dict[type[Tuner], tuple[str, str]] = {}


def builtin_dir() -> str:
    return os.path.dirname(builtin_package.__file__)


def normalize_name(name: str) -> str:
    """Accept ``tcp_buffer``, ``tcp_buffer_tuner.so`` (upstream) or ``tcp_buffer_tuner.py``."""
    for suffix in ("_tuner.so", PLUGIN_SUFFIX, ".so", ".py"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _tuner_classes(module: types.ModuleType) -> list[type[Tuner]]:
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, Tuner) and obj is not Tuner
            and obj.__module__ == module.__name__]


def builtin_tuners() -> list[type[Tuner]]:
    found = []
    for info in sorted(pkgutil.iter_modules(builtin_package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{builtin_package.__name__}.{info.name}")
        found += _tuner_classes(module)
    return found


def _check_acl(path: str | int, what: str, label: str) -> None:
    for attr, acl in _ACL_XATTRS if what == "directory" else _ACL_XATTRS[:1]:
        try:
            if isinstance(path, int):
                os.getxattr(path, attr)
            else:
                os.getxattr(path, attr, follow_symlinks=False)
        except OSError as e:
            if e.errno in _NO_ACL:
                continue
            raise UntrustedPlugin(f"cannot inspect ACL for {label}: {e.strerror}") from None
        raise UntrustedPlugin(f"{label} has {acl}")


def _check_owner_mode(st: os.stat_result, label: str) -> None:
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedPlugin(f"untrusted {label} (mode {stat.S_IMODE(st.st_mode):o}, "
                              f"uid {st.st_uid})")


def check_directories(path: str) -> None:
    """Every ancestor of ``path`` below / must be a root-owned, unwritable real directory."""
    parts = Path(path).parts
    if not os.path.isabs(path) or any(p in ("", ".", "..") for p in parts[1:]):
        raise UntrustedPlugin(f"plugin path '{path}' is not absolute and normalized")
    for i in range(2, len(parts)):
        d = os.path.join(*parts[:i])
        label = f"plugin directory '{d}'"
        try:
            st = os.lstat(d)
        except OSError as e:
            raise UntrustedPlugin(f"cannot stat {label}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UntrustedPlugin(f"untrusted {label} (mode {stat.S_IMODE(st.st_mode):o}, "
                                  f"uid {st.st_uid})")
        _check_owner_mode(st, label)
        _check_acl(d, "directory", label)


def read_trusted(path: str, what: str = "plugin") -> str:
    """The text of a plugin file that passed the trust checks (``what`` names it in errors)."""
    check_directories(path)
    label = f"{what} '{path}'"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise UntrustedPlugin(f"cannot inspect {label}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedPlugin(f"untrusted {label} (mode {stat.S_IMODE(st.st_mode):o}, "
                                  f"uid {st.st_uid})")
        _check_owner_mode(st, label)
        _check_acl(fd, "file", label)
        return f.read().decode()


def _refuse(path: str, reason: Exception) -> list[type[Tuner]]:
    log.err(str(reason))
    log.err(f"refusing untrusted plugin '{path}'")
    return []


def read_bpf_source(plugin_path: str, name: object) -> str:
    """The text of the BPF source ``name`` that the plugin ``plugin_path`` names, checked like
    the plugin itself. Only a file beside the plugin: a name that could lead elsewhere
    ("../x.bpf.c", "/tmp/x.bpf.c", "sub/x.bpf.c") is refused."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "\0" in name
            or os.path.basename(name) != name):
        raise UntrustedPlugin(f"plugin BPF source {name!r} of '{plugin_path}' is not a file "
                              f"name in the plugin's directory")
    path = os.path.join(os.path.dirname(plugin_path), name)
    return read_trusted(path, "plugin BPF source")


def bpf_text(tuner: Tuner) -> str | None:
    """The checked text of a plugin tuner's BPF source; None for a built-in tuner, whose source
    is read from bpf_dir()."""
    cls = type(tuner)
    if cls.plugin_dir is None:
        return None
    name, text = _plugin_sources.get(cls, (None, ""))
    if name is None or name != tuner.bpf_source:
        raise UntrustedPlugin(f"BPF source {tuner.bpf_source!r} of plugin tuner "
                              f"'{tuner.name}' did not pass the plugin checks")
    return text


def load_plugin(path: str) -> list[type[Tuner]]:
    """Tuner classes defined in a trusted plugin file ([] and an error line otherwise)."""
    try:
        source = read_trusted(path)
    except (UntrustedPlugin, OSError, ValueError) as e:
        return _refuse(path, e)
    name = os.path.basename(path).removesuffix(".py")
    module = types.ModuleType(f"bpftune_plugin_{name}")
    module.__file__ = path
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except Exception as e:
        log.err(f"error initializing '{path}': {e}")
        return []
    classes = _tuner_classes(module)
    sources = {}
    for cls in classes:
        if cls.bpf_source:
            try:
                sources[cls] = (cls.bpf_source, read_bpf_source(path, cls.bpf_source))
            except (UntrustedPlugin, OSError, ValueError) as e:
                return _refuse(path, e)
    for cls in classes:
        cls.plugin_dir = os.path.dirname(path)
    _plugin_sources.update(sources)
    return classes


def plugin_tuners(directory: str) -> list[type[Tuner]]:
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        log.debug(f"could not open dir '{directory}': {e.strerror}")
        return []
    found = []
    for name in names:
        if name.endswith(PLUGIN_SUFFIX):
            path = os.path.join(os.path.abspath(directory), name)
            log.debug(f"found lib {path}, init")
            found += load_plugin(path)
    return found


def discover(allow: list[str], plugin_dir: str) -> list[type[Tuner]]:
    """Built-in tuners then plugins, filtered by the allow-list (``-a``) if one is given."""
    wanted = {normalize_name(a) for a in allow}
    found = []
    for cls in builtin_tuners() + plugin_tuners(plugin_dir):
        if wanted and cls.name not in wanted:
            log.debug(f"skipping {cls.name} as not on allowlist")
            continue
        found.append(cls)
    return found
