"""The ``bpftune`` command, option-compatible with upstream bpftune (reference section 1)."""

from __future__ import annotations

import argparse
import os
import sys

from bpftune import __version__, plugins
from bpftune.learning import MAX_RATE, MIN_RATE
from bpftune.log import log
from bpftune.paths import AUDIT_FILE, DEFAULT_CGROUP

USAGE = f"""Usage: bpftune [OPTIONS]
	OPTIONS:
		--help,            -h	this message
		--allow,           -a	tuner to allow (name, or upstream file name); repeatable
		--cgroup,          -c	cgroup v2 directory to attach cgroup programs to
		--debug,           -d	debug mode; debug logging
		--daemon,          -D	daemonize
		--enable,          -E	re-enable TUNER, handed over to an administrator (root)
		--netns NAME|COOKIE	with -E: only in that network namespace
		--libdir,          -l	directory to load plugin tuners (*_tuner.py) from
		--learning_rate,   -r	learning rate (0-4); higher adapts faster
		--port,            -p	query server also listens on this 127.0.0.1 port
		--query,           -q	query a running bpftune (try "-q help")
		--rollback,        -R	on exit, roll back every change bpftune made
		--stderr,          -s	log to stderr instead of syslog
		--support,         -S	print which features this system supports and exit
		--btf FILE	with -S: report for the kernel whose BTF (vmlinux or raw) this is
		--advise	advice mode: change nothing; recommend (see "-q advice")
		--audit-file FILE	audit trail of every change (default {AUDIT_FILE})
		--version,         -V	show version and exit
"""


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 1, never a traceback
        raise UsageError(message)


def _learning_rate(text: str) -> int:
    try:
        rate = int(text)
    except ValueError:
        rate = -1
    if not MIN_RATE <= rate <= MAX_RATE:
        raise UsageError(f"values {MIN_RATE}-{MAX_RATE} are supported for the learning rate")
    return rate


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="bpftune", add_help=False, allow_abbrev=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("-a", "--allow", action="append", default=[])
    p.add_argument("-c", "--cgroup", default=DEFAULT_CGROUP)
    p.add_argument("-d", "--debug", action="store_true")
    p.add_argument("-D", "--daemon", action="store_true")
    p.add_argument("-E", "--enable")
    p.add_argument("-l", "--libdir", default=plugins.DEFAULT_PLUGIN_DIR)
    p.add_argument("-L", "--legacy", action="store_true")
    p.add_argument("-r", "--learning_rate", default="4")
    p.add_argument("-p", "--port", type=int, default=0)
    p.add_argument("-P", "--print-libdir", action="store_true")
    # One word (upstream), or more: "-q history 50" asks for the last 50 records.
    p.add_argument("-q", "--query", nargs="+")
    p.add_argument("-R", "--rollback", action="store_true")
    p.add_argument("-s", "--stderr", action="store_true")
    p.add_argument("-S", "--support", action="store_true")
    p.add_argument("-V", "--version", action="store_true")
    p.add_argument("--btf")
    p.add_argument("--advise", action="store_true")
    p.add_argument("--audit-file", default=AUDIT_FILE)
    p.add_argument("--netns")
    args, extra = p.parse_known_args(argv)
    if extra:
        raise UsageError(f"unrecognized option '{extra[0]}'")
    args.learning_rate = _learning_rate(args.learning_rate)
    if args.query is not None:
        args.query = " ".join(args.query)
    if not args.audit_file:
        raise UsageError("--audit-file needs a file name")
    args.audit_file = os.path.abspath(args.audit_file)  # logged and queried in full
    if args.btf is not None and not args.support:
        raise UsageError("--btf is only valid with -S")
    if args.advise and (args.support or args.query is not None or args.enable is not None):
        raise UsageError("--advise is an option of the daemon, not of -S, -q or -E")
    _check_enable(args)
    return args


def _check_enable(args: argparse.Namespace) -> None:
    if args.netns is not None and args.enable is None:
        raise UsageError("--netns is only valid with -E")
    if args.enable is not None and args.query is not None:
        raise UsageError("-E and -q cannot be used together")
    for what, word in (("tuner", args.enable), ("netns", args.netns)):
        # The request is words on one line: a name cannot hold spaces.
        if word is not None and (not word or any(c.isspace() or c == "\0" for c in word)):
            raise UsageError(f"invalid {what} name '{word}'")


def _support(args: argparse.Namespace) -> int:
    from bpftune import support
    from bpftune.btf import BtfError

    if args.btf is not None:  # another kernel: nothing is loaded, so no root needed
        try:
            found = support.from_btf_file(args.btf)
        except BtfError as e:
            raise UsageError(str(e)) from None
    elif os.geteuid() != 0:
        raise UsageError("must be run as root to probe BPF support")
    else:
        found = support.probe()
    lines, usable = support.report(found, plugins.builtin_tuners())
    for line in lines:
        log.notice(line)
    return 0 if usable else 1


def _query(args: argparse.Namespace) -> int:
    from bpftune import query

    return query.client(args.query, args.port)


def _enable(args: argparse.Namespace) -> int:
    from bpftune import query

    request = " ".join(w for w in ("enable", args.enable, args.netns) if w is not None)
    return query.command(request, args.port)


def _daemonize() -> None:
    if os.fork():
        os._exit(0)
    os.setsid()


def _run(args: argparse.Namespace) -> int:
    from bpftune.engine import Engine, Options, StartError

    if os.geteuid() != 0:
        raise UsageError("must be run as root (BPF programs, sysctls and namespaces need it)")
    if args.daemon:
        _daemonize()
    engine = Engine(Options(learning_rate=args.learning_rate, rollback=args.rollback,
                            cgroup=args.cgroup, allow=args.allow, plugin_dir=args.libdir,
                            port=args.port, advise=args.advise,
                            audit_file=args.audit_file))
    try:
        engine.start()
        engine.run()
    except StartError as e:
        log.err(str(e))
        return 1
    finally:
        engine.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
        if args.help:
            sys.stderr.write(USAGE)
            return 0
        if args.version:
            print(f"bpftune v{__version__}")
            return 0
        if args.print_libdir:
            print(plugins.builtin_dir())
            return 0
        client = args.query is not None or args.enable is not None
        log.configure(to_stderr=args.stderr or args.support or client, debug=args.debug)
        if args.support:
            return _support(args)
        if args.query is not None:
            return _query(args)
        if args.enable is not None:
            return _enable(args)
        return _run(args)
    except UsageError as e:
        sys.stderr.write(f"bpftune: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 0
