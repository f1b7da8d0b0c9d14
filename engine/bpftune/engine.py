"""The daemon: load tuners, poll the shared ring buffer, dispatch events, and on exit
summarize (and with -R roll back) every change."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bpftune import __version__, caps, plugins, procnet, support
from bpftune.audit import AuditTrail
from bpftune.bpf import (
    BpfError,
    Cgroup,
    CompileRequest,
    Module,
    Programs,
    bpf_dir,
    ensure_tracefs,
)
from bpftune.btf import Btf, BtfError
from bpftune.changes import GLOBAL, Changes, StateFile
from bpftune.correlation import Correlations
from bpftune.events import GENERATIONS, Event, event_tuner_id
from bpftune.handback import HandBackError
from bpftune.hooks import NotNeeded, Plan
from bpftune.learning import LearningRate
from bpftune.log import log
from bpftune.netns import Namespaces, NetnsError
from bpftune.netns_watch import NetnsWatch
from bpftune.paths import AUDIT_FILE, DEFAULT_CGROUP, PID_FILE, RUN_DIR, STATE_DIR
from bpftune.query import QueryServer
from bpftune.sysctl import SysctlError, Value, format_value
from bpftune.tuner import Strategy, Tuner, TunerState, choose_strategy
from bpftune.verify import Verifier, VerifyError, Windows

POLL_MS = 1000  # events wake the loop at once; idle, it wakes once a second
TICK_SECONDS = 1.0


class StartError(Exception):
    """The daemon cannot start; the message is the one line the user sees."""


@dataclass
class Options:
    learning_rate: int = 4
    rollback: bool = False
    cgroup: str = DEFAULT_CGROUP
    allow: list[str] = field(default_factory=list)
    port: int = 0
    plugin_dir: str = plugins.DEFAULT_PLUGIN_DIR
    state_dir: str = STATE_DIR
    #: Advice mode: tuners propose, nothing is written (bpftune.advice).
    advise: bool = False
    audit_file: str = AUDIT_FILE


class Engine:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.learning_rate = LearningRate(options.learning_rate)
        self.correlations = Correlations()
        self.tuners: list[Tuner] = []
        #: Tuners that did not load, with the one-line reason (for -q tuners).
        self.unloaded: dict[str, str] = {}
        self.support: support.Support | None = None
        self.started = time.time()
        self.stopping = False
        self.namespaces: Namespaces | None = None
        self.changes: Changes | None = None
        #: Made now, in the namespace bpftune starts in (see AuditTrail); files on first use.
        self.audit = AuditTrail(options.audit_file)
        self.programs: Programs | None = None
        self.cgroup: Cgroup | None = None
        self._lock_fd: int | None = None
        self.query_server: QueryServer | None = None
        self.netns_watch: NetnsWatch | None = None
        #: Judges every change (bpftune.verify); None in advice mode.
        self.verifier: Verifier | None = None
        # Held while events and ticks change state, and while a query reads it.
        self.lock = threading.RLock()

    # Start-up.
    def start(self) -> None:
        # From here on SIGTERM/SIGINT only ask the loop to stop, so a signal that arrives
        # while starting still ends with cleanup (unmount, detach, summary, rollback).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        self._lock_single_instance()
        self.namespaces = Namespaces()
        mode = "advise" if self.options.advise else "tune"
        self.changes = Changes(self.namespaces, StateFile(self.options.state_dir, mode),
                               advise=self.options.advise)
        self.changes.audit = self.audit
        if not self.options.advise:  # nothing changes, so nothing to verify
            try:
                windows = Windows.from_env()
            except VerifyError as e:
                raise StartError(str(e)) from None
            self.verifier = self.changes.verifier = Verifier(self.changes, (), windows)
        self.changes.adopt_leftovers()
        try:
            ensure_tracefs()
            btf = Btf.load()
            self.cgroup = Cgroup(self.options.cgroup)
            self.programs = Programs(btf, self.learning_rate, self.dispatch)
        except (OSError, BtfError) as e:
            raise StartError(str(e)) from None
        self.support = support.probe(btf)
        self._log_support()
        self.load(plugins.discover(self.options.allow, self.options.plugin_dir))
        if not self.active_tuners():
            raise StartError("no tuners could be loaded")
        if self.verifier is not None:
            self.verifier.use_tuners(self.tuners)
        for tuner in self.active_tuners():
            tuner.started()
        self.programs.loading_done()
        self.support.btf = None  # only plans needed it
        caps.drop()  # keep only what running needs (caps.KEPT); before any thread starts
        try:  # watching first, so that nothing created or destroyed meanwhile is missed
            self.netns_watch = NetnsWatch(self.namespaces, self.announce_new_namespaces,
                                          self.netns_destroyed)
        except OSError as e:
            raise StartError(f"cannot watch network namespaces: {e}") from None
        with self.lock:
            self.namespaces.scan()
            for ref in self.namespaces.take_new():
                log.debug(f"found netns {ref.path} (cookie {ref.cookie})")
        try:
            self.query_server = QueryServer(self, self.options.port)
        except OSError as e:
            raise StartError(f"cannot start the query server: {e}") from None
        names = ", ".join(t.name for t in self.active_tuners())
        log.notice(f"bpftune v{__version__} started; active tuners: {names}")
        if self.options.advise:
            log.notice("advice mode: no tunable will be changed; each change a tuner would "
                       "make is a recommendation ('bpftune -q advice')")

    def _log_support(self) -> None:
        """Upstream's support lines ("bpftune works fully", per-netns policy) and each
        tuner's plan, before any tuner's own lines."""
        lines, _ = support.report(self.support, plugins.builtin_tuners())
        for line in lines:
            log.notice(line)

    def _lock_single_instance(self) -> None:
        fd = os.open(PID_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            raise StartError(f"bpftune is already running (pid {other})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def load(self, classes: list[type[Tuner]]) -> None:
        """Plan each tuner, compile every module at once (in loader children, side by
        side), then start each tuner whose programs loaded."""
        tuners = [t for t in (self._plan(cls, tuner_id) for tuner_id, cls in enumerate(classes))
                  if t is not None]
        results = self.programs.load([r for t in tuners for r in self._requests(t)])
        results |= self._fentry_fallback(tuners, results)
        for tuner in tuners:
            self._start(tuner, results)

    def _plan(self, cls: type[Tuner], tuner_id: int) -> Tuner | None:
        tuner = cls(self, tuner_id)
        try:
            tuner.plans = cls.strategy_plans(self.programs.btf, self.support.present)
            tuner.hooks = tuner.plans[tuner.strategy]
            self._check_tunables(tuner)
        except NotNeeded as e:
            self.unloaded[tuner.name] = f"not needed: {e}"
            return None
        except Exception as e:
            self._failed(tuner, e)
            return None
        return tuner

    def _start(self, tuner: Tuner, results: dict[str, Module | BpfError]) -> None:
        try:
            self._take_bpf(tuner, results)
            tuner.init()
        except Exception as e:
            self._failed(tuner, e)
            self._unload_bpf(tuner)
            return
        tuner.state = TunerState.ACTIVE
        tuner.arm_strategy_timeout(time.monotonic())
        self.tuners.append(tuner)
        log.debug(f"successfully initialized tuner {tuner!r} ({tuner.hooks.describe()})")

    def _failed(self, tuner: Tuner, e: Exception) -> None:
        self.unloaded[tuner.name] = f"cannot load: {e}"
        log.err(f"error initializing '{tuner.name}': {e}")

    def _requests(self, tuner: Tuner, *, others: bool = True) -> list[CompileRequest]:
        """The tuner's module for its current plan (and strategy); with ``others``, the
        other strategies' modules to compile only: an error of LLVM's BPF backend (e.g.
        over 512 bytes of stack) is better found at start than at a switch."""
        if not tuner.bpf_source:
            return []
        requests = [self._request(tuner, tuner.name, tuner.hooks,
                                  cgroup={p.function: p.kind
                                          for p in tuner.cgroup_attachments()})]
        if others:
            requests += [self._request(tuner, f"{tuner.name}/{strategy.name}", plan,
                                       attach=False)
                         for strategy, plan in tuner.plans.items()
                         if strategy is not tuner.strategy]
        return requests

    def _request(self, tuner: Tuner, name: str, plan: Plan, **options) -> CompileRequest:
        source = Path(tuner.plugin_dir or bpf_dir()) / tuner.bpf_source
        return self.programs.request(name, source, event_tuner_id(tuner.id, tuner.generation),
                                     tuner.fields, text=plugins.bpf_text(tuner),
                                     defines=tuner.id_defines() + plan.cflags()
                                     + tuner.compile_defines(),
                                     checks=tuner.compile_checks(), **options)

    def _fentry_fallback(self, tuners: list[Tuner], results: dict[str, Module | BpfError]
                         ) -> dict[str, Module | BpfError]:
        """If the kernel refused a tuner's fentry hooks (BTF lists the function, but it may
        not be traceable), compile again with its plan without fentry."""
        retry = [t for t in tuners if isinstance(results.get(t.name), BpfError)
                 and t.hooks.uses_trampolines()]
        for tuner in retry:
            tuner.plans = type(tuner).strategy_plans(self.programs.btf,
                                                     self.support.present - {"fentry"})
            tuner.hooks = tuner.plans[tuner.strategy]
            log.notice(f"{tuner.name}: fentry refused ({results[tuner.name]}); "
                       f"using {tuner.hooks.describe()}")
        return self.programs.load([r for t in retry for r in self._requests(t)]) if retry else {}

    def _take_bpf(self, tuner: Tuner, results: dict[str, Module | BpfError]) -> None:
        """The tuner's loaded module (its cgroup programs attached), or its error."""
        mine = {name: result for name, result in results.items()
                if name == tuner.name or name.startswith(f"{tuner.name}/")}
        for name, result in mine.items():
            if name != tuner.name and isinstance(result, Module):
                result.close()  # another strategy's, compiled only: nothing to keep
        errors = [(name, e) for name, e in mine.items() if isinstance(e, BpfError)]
        module = mine.get(tuner.name)
        if errors:
            if isinstance(module, Module):
                module.close()
            name, e = errors[0]
            raise BpfError(f"cannot load BPF program {tuner.bpf_source}"
                           f"{name.removeprefix(tuner.name)}: {e}")
        tuner.bpf = module
        self._attach_cgroup_programs(tuner)
        tuner.publish_values()

    def _attach_cgroup_programs(self, tuner: Tuner) -> None:
        programs = tuner.cgroup_attachments()
        if programs:  # an older bpftune's, whatever strategy it was in
            self.cgroup.detach_stale([p.function for p in tuner.every_cgroup_attachment()])
        for p in programs:
            self.cgroup.attach(tuner.bpf, p.function, p.kind)

    def _check_tunables(self, tuner: Tuner) -> None:
        for t in tuner.tunables:
            if not t.sysctl:
                continue
            try:
                value = self.changes.read(t)
            except SysctlError as e:
                if t.optional:
                    log.debug(f"{tuner.name}: optional {e}")
                    continue
                raise
            if not t.string and len(value) != t.values:
                raise RuntimeError(f"'{t.name}' has {len(value)} values, expected {t.values}")

    def active_tuners(self) -> list[Tuner]:
        return [t for t in self.tuners if t.state is TunerState.ACTIVE]

    # Running.
    def dispatch(self, event: Event) -> None:
        with self.lock:
            self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        tuner = next((t for t in self.tuners if t.id == event.tuner_index), None)
        if tuner is None:
            log.err(f"no tuner for id {event.tuner_id}")
            return
        if event.generation != tuner.generation:
            log.debug(f"event scenario [{event.scenario_id}] for tuner {tuner!r} skipped: "
                      f"sent by BPF programs since unloaded (strategy switch)")
            return
        active = tuner.state is TunerState.ACTIVE and not self.changes.is_manual(
            tuner, event.netns_cookie)
        log.debug(f"event scenario [{event.scenario_id}] for tuner {tuner!r} netns "
                  f"{event.netns_cookie} "
                  f"{'sent' if active else 'skipped due to inactive tuner/netns'}")
        if not active:
            return
        try:
            if tuner.acts_in_netns:
                # Only namespaces bpftune can enter are acted on, and those are forgotten
                # when they are destroyed: no per-namespace state for others.
                self.namespaces.ensure(event.netns_cookie, event.pid)
                if self.verifier is not None:
                    self.verifier.warm(event.netns_cookie)
            tuner.handle(event)
        except NetnsError as e:  # the namespace went away while we acted on it
            log.debug(f"{tuner.name}: {e}")
        except Exception as e:  # one tuner's bug must not stop the daemon
            log.err(f"{tuner.name}: error handling event: {e!r}")

    def run(self) -> None:
        next_tick = time.monotonic() + TICK_SECONDS
        while not self.stopping:
            self.programs.poll(POLL_MS)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_SECONDS
                with self.lock, procnet.one_reading():
                    self._tick(now)

    def _tick(self, now: float) -> None:
        for tuner in self.active_tuners():
            try:
                tuner.tick(now)
            except Exception as e:
                log.err(f"{tuner.name}: error in periodic check: {e!r}")
            if tuner.strategy_due is not None and now >= tuner.strategy_due:
                try:
                    self._reevaluate_strategies(tuner)
                except Exception as e:
                    log.err(f"{tuner.name}: error switching strategies: {e!r}")
                finally:
                    tuner.arm_strategy_timeout(now)  # the (new) current strategy's timeout
        if self.verifier is not None:
            try:  # after the tuners: a change made in this tick starts its window here
                self.verifier.tick(now)
            except Exception as e:
                log.err(f"error verifying changes: {e!r}")
        self.namespaces.rescan_if_wanted()
        self.changes.forget_unknown_hand_overs(self.namespaces.last_full_scan)
        self.announce_new_namespaces()

    # Strategies.
    def _reevaluate_strategies(self, tuner: Tuner) -> None:
        """Evaluate every strategy of ``tuner`` and switch to the best if it is another."""
        evaluations: dict[Strategy, float | None] = {}
        for strategy in tuner.strategies:
            try:
                evaluations[strategy] = tuner.evaluate_strategy(strategy)
            except Exception as e:  # that strategy cannot win; the others still can
                log.err(f"{tuner.name}: error evaluating strategy '{strategy.name}': {e!r}")
                evaluations[strategy] = None
        tuner.strategy_evaluations = {s.name: v for s, v in evaluations.items()}
        said = ", ".join(f"{s.name}={'failed' if v is None else f'{v:g}'}"
                         for s, v in evaluations.items())
        best = choose_strategy(evaluations.items())
        if best is None or best is tuner.strategy:
            log.debug(f"tuner '{tuner.name}': keeping strategy '{tuner.strategy.name}' "
                      f"(evaluations: {said})")
        else:
            old = tuner.strategy
            if self._switch_strategy(tuner, best):
                log.notice(f"tuner '{tuner.name}': strategy '{old.name}' -> '{best.name}' "
                           f"(evaluations: {said})")

    def _switch_strategy(self, tuner: Tuner, new: Strategy) -> bool:
        """As upstream: the tuner's fini, its programs unloaded, the new strategy's loaded,
        its init. Back to the old strategy if the new one's programs do not load (False);
        a tuner that cannot load either stops."""
        old = tuner.strategy
        self.programs.drain()  # what the old programs sent so far is handled as theirs
        try:
            tuner.fini()
        except Exception as e:
            log.err(f"{tuner.name}: error finishing strategy '{old.name}': {e!r}")
        self._unload_bpf(tuner)
        for strategy in (new, old):
            try:
                self._start_strategy(tuner, strategy)
                return strategy is new
            except Exception as e:
                log.err(f"tuner '{tuner.name}': cannot start strategy '{strategy.name}': {e}")
                self._unload_bpf(tuner)
        log.err(f"tuner '{tuner.name}' stops: none of its strategies loads")
        tuner.state = TunerState.INACTIVE
        return False

    def _start_strategy(self, tuner: Tuner, strategy: Strategy) -> None:
        tuner.strategy, tuner.hooks = strategy, tuner.plans[strategy]
        tuner.generation = (tuner.generation + 1) % GENERATIONS  # tells its events apart
        self._take_bpf(tuner, self.programs.load(self._requests(tuner, others=False)))
        tuner.init()

    def _on_signal(self, _signum, _frame) -> None:
        self.stopping = True

    # Namespaces coming and going.
    def announce_new_namespaces(self) -> None:
        """Tell every tuner about the namespaces registered since last time (by a BPF
        event, a new name, a rescan, a tuner's event from a namespace not seen before)."""
        with self.lock:
            for ref in self.namespaces.take_new():
                log.debug(f"netns created (cookie {ref.cookie})")
                for tuner in self.active_tuners():
                    tuner.netns_created(ref.cookie)

    def netns_destroyed(self, cookie: int) -> None:
        """Free everything kept about a namespace that is gone; its scenario counts live on
        in the totals."""
        with self.lock:
            log.debug(f"netns destroyed (cookie {cookie})")
            for tuner in self.tuners:
                try:
                    tuner.netns_destroyed(cookie)
                except Exception as e:
                    log.err(f"{tuner.name}: error forgetting netns {cookie}: {e!r}")
            self.correlations.forget(cookie)
            if self.verifier is not None:
                self.verifier.forget_netns(cookie)
            self.changes.forget_netns(cookie)

    def table_sizes(self) -> dict[str, int]:
        """Entries kept per namespace, everywhere: they must shrink as namespaces go."""
        sizes = self.namespaces.tables() | {
            "records": len(self.changes.records),
            "scenario_counts": len(self.changes.scenario_counts),
            "manual": len(self.changes.manual),
            "held": len(self.changes.held),
            "correlations": len(self.correlations),
        }
        if self.verifier is not None:
            sizes |= self.verifier.table_sizes()
        for tuner in self.tuners:
            sizes |= {f"{tuner.name}.{k}": n for k, n in tuner.table_sizes().items()}
        return sizes

    # Administrator overrides.
    def disable(self, tuner: Tuner, cookie: int, tunable: str | None = None,
                new: Value | None = None, reason: str | None = None) -> None:
        """Hand ``tuner`` over to the administrator in one netns, or everywhere if global.
        For the audit trail: the ``tunable`` the administrator wrote and its ``new`` value
        where the caller knows them, and the ``reason`` it logged."""
        if self.namespaces.is_global(cookie):
            self.changes.hand_over(tuner.name, 0, tunable, new, reason)
            self.finish(tuner, TunerState.MANUAL)
        else:
            log.debug(f"setting state of netns (cookie {cookie}) to manual for '{tuner.name}'")
            self.changes.hand_over(tuner.name, cookie, tunable, new, reason)
            tuner.handed_over(cookie)

    def enable(self, name: str, netns: str | None, uid: int) -> str:
        """Hand tuner ``name`` back in the namespace ``netns`` (an ``ip netns`` name or a
        cookie; None or "global": where it was handed over as a whole, which unloaded it).
        The values there now become its new baseline. Returns what was done (also logged);
        HandBackError, with the reason, if it was not handed over there."""
        with self.lock:
            tuner, cookie = self._handed_over(name, netns)
            # Compiled under the lock, as at a strategy switch: a hand-back is rare.
            fresh = self._reloaded(tuner) if cookie == GLOBAL else None
            baseline = self._baseline(tuner, cookie)
            self.changes.hand_back(name, cookie)  # before init: what init changes is recorded
            if fresh is None:
                tuner.handed_back(cookie)
            else:
                self._restart(tuner, fresh)
            message = (f"tuner '{name}' re-enabled in {self._where(cookie)} by uid {uid}; "
                       f"current values are its new baseline: {baseline}")
            self.changes.audit_hand_back(name, cookie, uid, message)
            log.notice(message)
            return message

    def _handed_over(self, name: str, netns: str | None) -> tuple[Tuner, int]:
        """The tuner ``name`` and the ledger cookie of ``netns``, if it is handed over
        there."""
        tuner = next((t for t in self.tuners if t.name == name), None)
        if tuner is None and name not in self.unloaded:
            raise HandBackError(f"no tuner '{name}'")
        cookie = self._netns_cookie(netns)
        where = self._where(cookie)
        if tuner is None:
            raise HandBackError(f"tuner '{name}' is not disabled in {where}: it is not "
                                f"loaded ({self.unloaded[name]})")
        if cookie == GLOBAL and tuner.state is not TunerState.MANUAL:
            raise HandBackError(f"tuner '{name}' is not disabled in {where} (it is "
                                f"{tuner.state.value})")
        if cookie != GLOBAL and tuner.state is TunerState.MANUAL:
            # It is unloaded: giving it one namespace back would do nothing now.
            raise HandBackError(f"tuner '{name}' is disabled everywhere (handed over in "
                                f"global ns): re-enable it there first (bpftune -E {name})")
        if cookie != GLOBAL and (name, cookie) not in self.changes.manual:
            raise HandBackError(f"tuner '{name}' is not disabled in {where}")
        return tuner, cookie

    def _netns_cookie(self, netns: str | None) -> int:
        """GLOBAL for the global netns; otherwise the cookie of the namespace ``ip netns``
        calls ``netns``, or of the one with that cookie (N or cookie-N, as queries name it),
        if bpftune knows it."""
        if netns is None or netns == "global":
            return GLOBAL
        cookie = self.namespaces.named(netns)
        if cookie is None:
            number = netns.removeprefix("cookie-")
            if not number.isdigit():
                raise HandBackError(f"no network namespace '{netns}'")
            cookie = int(number)
            if not (self.namespaces.tracked(cookie)
                    or any(c == cookie for _, c in self.changes.manual)):
                raise HandBackError(f"no network namespace with cookie {cookie}")
        return GLOBAL if self.namespaces.is_global(cookie) else cookie

    def _where(self, cookie: int) -> str:
        if cookie == GLOBAL:
            return "global ns"
        name = self.namespaces.name(cookie)
        if name == f"cookie-{cookie}":
            return f"netns cookie {cookie}"
        return f"netns '{name}' (cookie {cookie})"

    def _baseline(self, tuner: Tuner, cookie: int) -> str:
        """The live values of the tuner's tunables in that namespace, as the log shows them."""
        tunables = [t for t in tuner.tunables
                    if t.sysctl and (cookie == GLOBAL or t.namespaced)]
        values = self.changes.read_many(tunables, cookie)
        return ", ".join(f"{n} ({format_value(v)})" for n, v in values.items()) or "none"

    def _reloaded(self, old: Tuner) -> Tuner:
        """A new instance of a tuner handed over everywhere (nothing kept from before, as at
        start), its programs for its first strategy loaded and attached."""
        tuner = type(old)(self, old.id)
        tuner.given_back = True
        tuner.plans = old.plans  # made at start: the kernel's BTF is freed since
        tuner.hooks = tuner.plans[tuner.strategy]
        tuner.generation = (old.generation + 1) % GENERATIONS  # old programs' events: stale
        try:
            self._take_bpf(tuner, self.programs.load(self._requests(tuner, others=False)))
        except Exception as e:
            self._unload_bpf(tuner)
            raise HandBackError(f"cannot re-enable tuner '{old.name}': {e}") from None
        return tuner

    def _restart(self, old: Tuner, tuner: Tuner) -> None:
        """Start ``tuner`` (loaded by ``_reloaded``) in the place of ``old``; if it fails,
        ``old`` stays handed over."""
        try:
            tuner.init()
            tuner.started()
        except Exception as e:
            self._unload_bpf(tuner)
            self.changes.hand_over(old.name, GLOBAL)
            raise HandBackError(f"cannot re-enable tuner '{old.name}': {e}") from None
        tuner.state = TunerState.ACTIVE
        tuner.arm_strategy_timeout(time.monotonic())
        self.tuners[self.tuners.index(old)] = tuner
        for name, cookie in list(self.changes.manual):  # its namespaces still handed over
            if name == tuner.name and cookie != GLOBAL:
                tuner.handed_over(cookie)
        log.debug(f"successfully initialized tuner {tuner!r} ({tuner.hooks.describe()})")

    # Shutdown.
    def finish(self, tuner: Tuner, state: TunerState) -> None:
        """Summarize a tuner's work, roll it back with -R, unload it."""
        if tuner.state is not TunerState.ACTIVE:
            return
        try:  # upstream's order: sample lines, the tuner's fini, then the summary
            for line in tuner.sample_lines():
                log.notice(line)
        except Exception as e:
            log.err(f"{tuner.name}: error reading samples: {e!r}")
        try:
            tuner.fini()
        except Exception as e:  # still summarize, roll back and unload
            log.err(f"{tuner.name}: error finishing: {e!r}")
        for line in tuner.summarize() + self.changes.summary(tuner):
            log.notice(line)
        if self.verifier is not None:  # before a rollback changes what they judge
            self.verifier.cancel(tuner.name, None, "daemon stopping"
                                 if state is TunerState.INACTIVE else "tuner stopped")
        if self.options.rollback:
            self.changes.rollback(tuner.name)
        self._unload_bpf(tuner)
        tuner.state = state

    def _unload_bpf(self, tuner: Tuner) -> None:
        if tuner.bpf is not None:
            tuner.bpf.close()  # its attachments (cgroup links too) go with its fds
            tuner.bpf = None

    def stop(self) -> None:
        if self.query_server is not None:
            self.query_server.close()
        with self.lock:  # a query still being answered must not see the ledger change
            for tuner in self.tuners:
                self.finish(tuner, TunerState.INACTIVE)
            if self.options.rollback and self.changes is not None:
                self.changes.rollback()  # what earlier runs of unloaded tuners left behind
        if self.programs is not None:
            self.programs.close()
        if self.cgroup is not None:
            self.cgroup.close()
        if self.netns_watch is not None:
            self.netns_watch.close()
        self.audit.close()
        if self.namespaces is not None:
            self.namespaces.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
