"""The PMDA against a canned daemon state, driven by dbpmda (no pmcd, no daemon)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from bpftune.metrics import scenario_metric
from pcp_helpers import TOO_MANY, Dbpmda, FakeDaemon, canned_state, dbpmda, fetched, tunable
from pcp_helpers import tuner as tuner_state


@pytest.fixture
def var_dir():
    """A private PCP_VAR_DIR the PMDA can write to after dropping to user pcp."""
    d = Path(tempfile.mkdtemp(prefix="bpftune-pcpvar-", dir="/run"))
    (d / "config" / "pmda").mkdir(parents=True)
    for path in (d, d / "config"):
        os.chmod(path, 0o755)
    shutil.chown(d / "config" / "pmda", "pcp", "pcp")
    yield d
    shutil.rmtree(d)


@pytest.fixture
def fake():
    f = FakeDaemon(canned_state())
    yield f
    f.close()


def test_daemon_metrics_from_state(fake, var_dir):
    out = dbpmda(["wait 1", "fetch bpftune.daemon.up bpftune.daemon.pid bpftune.daemon.cpu "
                  "bpftune.daemon.uptime bpftune.daemon.version bpftune.daemon.rss"],
                 fake.path, var_dir)
    assert fetched(out, "486.0.0") == {None: "1"}
    assert fetched(out, "486.0.2") == {None: "4242"}
    assert fetched(out, "486.0.9") == {None: "1250"}  # msec
    assert fetched(out, "486.0.3") == {None: "61"}
    assert fetched(out, "486.0.1") == {None: '"0.1.0"'}
    assert fetched(out, "486.0.10") == {None: str(150 << 20)}


def test_tunable_values_per_namespace_and_position(fake, var_dir):
    out = dbpmda(["wait 1", "fetch bpftune.tcp_buffer.net.ipv4.tcp_rmem",
                  "fetch bpftune.tcp_buffer.original.net.ipv4.tcp_rmem",
                  "fetch bpftune.tcp_buffer.changes.net.ipv4.tcp_rmem",
                  "fetch bpftune.tcp_buffer.net.ipv4.tcp_moderate_rcvbuf",
                  "desc bpftune.tcp_buffer.net.ipv4.tcp_rmem"], fake.path, var_dir)
    # tcp_rmem is tunable 0 of cluster 10 in the canned registry: items 0..3
    assert fetched(out, "486.10.0") == {"global/min": "4096", "global/default": "131072",
                                        "global/max": "204800", "web/min": "4096",
                                        "web/default": "131072", "web/max": "163840"}
    assert fetched(out, "486.10.1")["global/max"] == "131072"
    assert fetched(out, "486.10.2") == {"global": "2", "web": "1"}
    assert fetched(out, "486.10.4") == {"global": "1"}  # one value: named by netns alone
    assert "Semantics: instant  Units: byte" in out


def test_scenario_counters_tuner_state_and_help(fake, var_dir):
    out = dbpmda(["wait 1",
                  "fetch bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s",
                  "fetch bpftune.tcp_buffer.scenarios.need_to_decrease_tcp_buffer_size_s",
                  "fetch bpftune.tuner.state bpftune.tuner.changes",
                  "desc bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s",
                  "text bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s",
                  "text indom 486.1", "label item 486.10.512"], fake.path, var_dir)
    assert fetched(out, "486.10.512") == {"global": "2", "web": "1"}
    assert fetched(out, "486.10.513") == {"global": "0"}
    assert fetched(out, "486.1.0") == {"tcp_buffer": '"active"', "sysctl": '"active"'}
    assert fetched(out, "486.1.3") == {"tcp_buffer": "4", "sysctl": "0"}
    assert "Semantics: counter  Units: count" in out
    assert "Need to increase buffer size(s) to maximize throughput." in out
    assert "network namespaces bpftune acted in" in out
    assert 'scenario="need to increase TCP buffer size(s)"' in out


def test_daemon_down_means_up_0_and_no_values(var_dir):
    down = FakeDaemon(None)  # accepts and closes without a reply, like a dying daemon
    try:
        out = dbpmda(["wait 1", "fetch bpftune.daemon.up bpftune.daemon.pid"], down.path,
                     var_dir)
    finally:
        down.close()
    assert fetched(out, "486.0.0") == {None: "0"}
    assert fetched(out, "486.0.2") == {}


def test_registry_survives_a_restart_without_daemon(fake, var_dir):
    dbpmda(["wait 1", "fetch bpftune.tcp_buffer.net.ipv4.tcp_rmem"], fake.path, var_dir)
    assert (var_dir / "config" / "pmda" / "486.registry.json").is_file()
    fake.close()
    out = dbpmda(["traverse bpftune.tcp_buffer", "desc bpftune.tcp_buffer.net.ipv4.tcp_rmem"],
                 fake.path, var_dir)
    assert "bpftune.tcp_buffer.changes.net.ipv4.tcp_rmem" in out
    assert "PMID: 486.10.0" in out


def test_reordered_tunables_keep_their_metric_numbers(fake, var_dir):
    dbpmda(["wait 1", "fetch bpftune.tcp_buffer.net.ipv4.tcp_rmem"], fake.path, var_dir)
    fake.state["tuners"][0]["tunables"].reverse()  # a newer daemon, another order
    out = dbpmda(["wait 1", "fetch bpftune.tcp_buffer.net.ipv4.tcp_rmem",
                  "fetch bpftune.tcp_buffer.net.ipv4.tcp_moderate_rcvbuf"], fake.path, var_dir)
    assert fetched(out, "486.10.0")["global/max"] == "204800"
    assert fetched(out, "486.10.4") == {"global": "1"}


COUNTERS = ("fetch bpftune.tuner.changes bpftune.tuner.scenarios "
            "bpftune.tcp_buffer.changes.net.ipv4.tcp_rmem "
            "bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s "
            "bpftune.daemon.events.received bpftune.daemon.cpu")


def counters(out: str) -> dict[str, dict]:
    return {pmid: fetched(out, pmid) for pmid in
            ("486.1.3", "486.1.4", "486.10.2", "486.10.512", "486.0.6", "486.0.9")}


def without_web(state: dict) -> dict:
    """The same daemon once namespace 'web' (cookie 77) is gone."""
    state = copy.deepcopy(state)
    del state["netns"]["77"]
    for tuner in state["tuners"]:
        for t in tuner["tunables"]:
            t["netns"].pop("77", None)
        for s in tuner["scenarios"]:
            s["counts"].pop("77", None)
    return state


def restarted(state: dict) -> dict:
    """A new daemon (another pid and start time) that counted as much again, except for
    events and CPU time, which are lower than its predecessor's."""
    state = copy.deepcopy(state)
    state["daemon"].update(pid=5151, started=state["daemon"]["started"] + 600, uptime=2.0,
                           events_received=3, cpu_seconds=0.25)
    return state


def test_counters_never_go_down(fake, var_dir):
    first = fake.state
    with Dbpmda(fake.path, var_dir) as db:
        db.polled(fake)
        assert counters(db.run(COUNTERS)) == {
            "486.1.3": {"tcp_buffer": "4", "sysctl": "0"},  # rmem 2 + 1, moderate_rcvbuf 1
            "486.1.4": {"tcp_buffer": "3", "sysctl": "0"},
            "486.10.2": {"global": "2", "web": "1"},
            "486.10.512": {"global": "2", "web": "1"},
            "486.0.6": {None: "12"}, "486.0.9": {None: "1250"}}

        # 'web' is gone: what it counted stays in the totals; its own instances go
        fake.state = without_web(first)
        db.polled(fake)
        assert counters(db.run(COUNTERS)) == {
            "486.1.3": {"tcp_buffer": "4", "sysctl": "0"},
            "486.1.4": {"tcp_buffer": "3", "sysctl": "0"},
            "486.10.2": {"global": "2"},
            "486.10.512": {"global": "2"},
            "486.0.6": {None: "12"}, "486.0.9": {None: "1250"}}

        # the daemon restarts and counts from 0 again ('web' is back)
        fake.state = restarted(first)
        db.polled(fake)
        after_restart = {
            "486.1.3": {"tcp_buffer": "8", "sysctl": "0"},
            "486.1.4": {"tcp_buffer": "6", "sysctl": "0"},
            "486.10.2": {"global": "4", "web": "2"},
            "486.10.512": {"global": "4", "web": "2"},
            "486.0.6": {None: "15"}, "486.0.9": {None: "1500"}}
        assert counters(db.run(COUNTERS)) == after_restart

    # a new PMDA (pmcd restarted it) carries on from the saved offsets
    assert (var_dir / "config" / "pmda" / "486.counters.json").is_file()
    with Dbpmda(fake.path, var_dir) as db:
        db.polled(fake)
        assert counters(db.run(COUNTERS)) == after_restart


def with_namespaces(state: dict, namespaces: dict[int, tuple[str, int, int]]) -> dict:
    """The state of a daemon (without 'web') where namespaces {cookie: (name, tcp_rmem
    changes, increase-scenario count)} exist besides the global one."""
    state = without_web(state)
    rmem, scenario = state["tuners"][0]["tunables"][0], state["tuners"][0]["scenarios"][0]
    for cookie, (name, changes, count) in namespaces.items():
        state["netns"][str(cookie)] = {"name": name, "global": False}
        rmem["netns"][str(cookie)] = {"current": [4096, 131072, 163840],
                                      "original": [4096, 131072, 131072],
                                      "changes": changes, "last_change": 1795600001.0}
        scenario["counts"][str(cookie)] = count
    return state


def tcp_buffer_totals(out: str) -> tuple[int, int]:
    return (int(fetched(out, "486.1.3")["tcp_buffer"]),
            int(fetched(out, "486.1.4")["tcp_buffer"]))


def test_counter_state_stays_bounded_while_namespaces_come_and_go(fake, var_dir):
    """1000 namespaces appear, count, (half of them) get a name, and go, 50 at a time."""
    base, path = fake.state, var_dir / "config" / "pmda" / "486.counters.json"
    # the PMDA may poll before the first show(): never let it see 'web' (its counts would
    # rightly stay in the totals, one more than this test expects)
    fake.state = with_namespaces(base, {})
    seen: dict[tuple[int, str], int] = {}  # (cookie, what) -> last count: all ever counted

    def show(namespaces: dict[int, tuple[str, int, int]], global_changes: int) -> None:
        fake.state = state = with_namespaces(base, namespaces)
        state["tuners"][0]["tunables"][0]["netns"]["0"]["changes"] = global_changes
        for cookie, (_, changes, count) in namespaces.items():
            seen[(cookie, "changes")], seen[(cookie, "scenario")] = changes, count
        db.polled(fake)

    def expected() -> tuple[int, int]:
        # global: tcp_rmem (shown) + tcp_moderate_rcvbuf 1; increase-scenario count 2
        return (global_changes + 1 + sum(n for (_, what), n in seen.items() if what == "changes"),
                2 + sum(n for (_, what), n in seen.items() if what == "scenario"))

    totals = (0, 0)
    with Dbpmda(fake.path, var_dir, poll=0.05) as db:
        for batch in range(20):
            cookies = range(1000 + 50 * batch, 1050 + 50 * batch)
            global_changes = 2 + batch
            # as the daemon first reports them: not named yet ('cookie-N')
            show({c: (f"cookie-{c}", 1, 2) for c in cookies}, global_changes)
            # counted more; the even ones are named now (same cookie): the same namespace
            show({c: (f"ns-{c}" if c % 2 == 0 else f"cookie-{c}", 2, 3) for c in cookies},
                 global_changes)
            now = tcp_buffer_totals(db.run(COUNTERS))
            assert now == expected(), f"batch {batch}"
            assert now >= totals
            totals = now
        # every batch went when the next came; the last one goes now
        show({}, global_changes)
        assert tcp_buffer_totals(db.run(COUNTERS)) == expected() == totals
        assert path.stat().st_size < 64 << 10, path.stat().st_size

        # names that come back (new namespaces, new cookies): one that went recently
        # carries on from its counts; one that went long ago (folded) starts again
        show({5000: ("ns-1998", 1, 1), 5001: ("ns-1000", 1, 1)}, global_changes)
        out = db.run(COUNTERS)
        assert fetched(out, "486.10.2") == {"global": str(global_changes), "ns-1998": "3",
                                            "ns-1000": "1"}
        assert fetched(out, "486.10.512") == {"global": "2", "ns-1998": "4", "ns-1000": "1"}
        assert tcp_buffer_totals(out) == expected()
        totals = expected()
    assert path.stat().st_size < 64 << 10, path.stat().st_size

    # a new PMDA, the same daemon: no count twice, none lost
    with Dbpmda(fake.path, var_dir, poll=0.05) as db:
        db.polled(fake)
        out = db.run(COUNTERS)
        assert tcp_buffer_totals(out) == totals
        assert fetched(out, "486.10.2")["ns-1998"] == "3"


@pytest.mark.parametrize("stop", ["quit", "SIGTERM", "SIGKILL"])
def test_counters_file_is_written_when_offsets_change_not_at_every_poll(fake, var_dir, stop):
    """Counts only going up are not saved at every poll; what the PMDA saw is saved when it
    stops, so a daemon restarted meanwhile loses nothing (except after a crash, where what
    it counted since the last save is lost); the same daemon loses nothing anyway."""
    path = var_dir / "config" / "pmda" / "486.counters.json"
    first = fake.state
    with Dbpmda(fake.path, var_dir) as db:
        db.polled(fake)
        assert tcp_buffer_totals(db.run(COUNTERS)) == (4, 3)
        written = path.stat()
        grown = fake.state = copy.deepcopy(first)
        for n in range(3, 8):  # tcp_rmem changes in 'global' 2 -> 7, events 12 -> 42
            grown["tuners"][0]["tunables"][0]["netns"]["0"]["changes"] = n
            grown["daemon"]["events_received"] = 6 * n
            db.polled(fake)
        out = db.run(COUNTERS)
        assert tcp_buffer_totals(out) == (9, 3)
        assert fetched(out, "486.0.6") == {None: "42"}
        now = path.stat()
        assert (now.st_ino, now.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
        if stop == "quit":  # pmcd closes the connection
            db.close()
        else:
            db.stop_pmda(getattr(signal, stop))

    if stop != "SIGKILL":
        # the daemon restarted while the PMDA was not running: what the old one counted
        # (last seen) plus what the new one did
        fake.state = restarted(first)
        with Dbpmda(fake.path, var_dir) as db:
            db.polled(fake)
            out = db.run(COUNTERS)
            assert tcp_buffer_totals(out) == (9 + 4, 3 + 3)
            assert fetched(out, "486.0.6") == {None: str(42 + 3)}
    else:
        # the same daemon went on counting: its counts plus the saved offsets (none)
        grown["tuners"][0]["tunables"][0]["netns"]["0"]["changes"] = 9
        with Dbpmda(fake.path, var_dir) as db:
            db.polled(fake)
            assert tcp_buffer_totals(db.run(COUNTERS)) == (11, 3)


def test_a_busy_daemon_is_asked_again(fake, var_dir):
    """Under a query flood the daemon answers 'error: too many connections', or drops the
    connection: the PMDA asks again, and the daemon stays up."""
    with Dbpmda(fake.path, var_dir) as db:
        db.polled(fake)
        for reply in (TOO_MANY, None, TOO_MANY):
            for _ in range(3):
                fake.refuse(3, reply)
                db.polled(fake)
                out = db.run("fetch bpftune.daemon.up bpftune.daemon.pid")
                assert fetched(out, "486.0.0") == {None: "1"}
                assert fetched(out, "486.0.2") == {None: "4242"}
        assert fake.refused == 27
        log = (var_dir / "bpftune.log").read_text()
        assert "not reachable" not in log, log

        # busy for good: down (an error reply is not a state), then up again
        fake.refuse(-1)
        deadline = time.monotonic() + 30
        while "not reachable" not in (var_dir / "bpftune.log").read_text():
            assert time.monotonic() < deadline, "a daemon always busy is still up"
            time.sleep(0.1)
        assert fetched(db.run("fetch bpftune.daemon.up"), "486.0.0") == {None: "0"}
        fake.refuse(0)
        db.polled(fake)
        assert fetched(db.run("fetch bpftune.daemon.up"), "486.0.0") == {None: "1"}


def test_new_tunables_and_scenarios_of_a_known_tuner_get_new_numbers(fake, var_dir):
    dbpmda(["wait 1", "fetch bpftune.tcp_buffer.net.ipv4.tcp_rmem"], fake.path, var_dir)
    # A newer daemon: tcp_buffer has a new tunable and a new scenario, both listed first.
    tcp_buffer = fake.state["tuners"][0]
    tcp_buffer["tunables"].insert(0, tunable("net.ipv4.tcp_wmem", {
        "0": {"current": [4096, 16384, 8388608], "original": [4096, 16384, 4194304],
              "changes": 1, "last_change": 1795600002.0}}))
    new = {"name": "need to retransmit less", "description": "Too many retransmits",
           "counts": {"0": 5}, "metric": scenario_metric("tcp_buffer", "need to retransmit less")}
    tcp_buffer["scenarios"] = [dict(s, id=i) for i, s in
                               enumerate([new, *tcp_buffer["scenarios"]])]
    wmem, scenario = "bpftune.tcp_buffer.net.ipv4.tcp_wmem", new["metric"]
    commands = ["wait 1", f"fetch {wmem}", f"fetch {scenario}",
                "fetch bpftune.tcp_buffer.changes.net.ipv4.tcp_wmem",
                "fetch bpftune.tcp_buffer.net.ipv4.tcp_rmem",
                "fetch bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s",
                f"desc {wmem}", f"desc {scenario}", "desc bpftune.tcp_buffer.net.ipv4.tcp_rmem",
                "desc bpftune.tcp_buffer.scenarios.need_to_decrease_tcp_buffer_size_s"]
    for _ in range(2):  # when first seen, and again from the registry after a restart
        out = dbpmda(commands, fake.path, var_dir)
        # old numbers unchanged: tcp_rmem 0..3, tcp_moderate_rcvbuf 4..7, scenarios 512, 513
        assert "PMID: 486.10.0\n" in out and "PMID: 486.10.513\n" in out
        assert fetched(out, "486.10.0")["global/max"] == "204800"
        assert fetched(out, "486.10.512") == {"global": "2", "web": "1"}
        # new ones take the next free numbers: tcp_wmem 8..11, the new scenario 514
        assert "PMID: 486.10.8\n" in out and "PMID: 486.10.514\n" in out
        assert fetched(out, "486.10.8")["global/max"] == "8388608"
        assert fetched(out, "486.10.10") == {"global": "1"}
        assert fetched(out, "486.10.514") == {"global": "5"}
    registry = json.loads((var_dir / "config" / "pmda" / "486.registry.json").read_text())
    tcp_buffer = next(t for t in registry if t["name"] == "tcp_buffer")
    assert [t["name"] for t in tcp_buffer["tunables"]] == [
        "net.ipv4.tcp_rmem", "net.ipv4.tcp_moderate_rcvbuf", "net.ipv4.tcp_wmem"]
    assert [(s["id"], s["name"]) for s in tcp_buffer["scenarios"]] == [
        (0, "need to increase TCP buffer size(s)"), (1, "need to decrease TCP buffer size(s)"),
        (2, "need to retransmit less")]


def published(name: str, value, *, counter: bool = False, instances: str = "",
              unit: str = "count") -> dict:
    return {"name": name, "help": f"{name} as the tuner counts them", "unit": unit,
            "counter": counter, "instances": instances,
            "metric": f"bpftune.tcp_buffer.{name}", "value": value}


def test_published_values_have_stable_numbers_help_units_and_instances(fake, var_dir):
    tcp_buffer = fake.state["tuners"][0]
    tcp_buffer["published"] = [published("chosen", {"cubic": 3, "bbr": 9}, counter=True,
                                         instances="algorithm"),
                               published("queued_bytes", 4096, unit="bytes")]
    commands = ["wait 1", "fetch bpftune.tcp_buffer.chosen",
                "fetch bpftune.tcp_buffer.queued_bytes", "desc bpftune.tcp_buffer.chosen",
                "desc bpftune.tcp_buffer.queued_bytes", "text bpftune.tcp_buffer.chosen"]
    out = dbpmda(commands, fake.path, var_dir)
    assert fetched(out, "486.10.256") == {"cubic": "3", "bbr": "9"}
    assert fetched(out, "486.10.257") == {None: "4096"}
    assert "Semantics: counter  Units: count" in out
    assert "Semantics: instant  Units: byte" in out
    assert "chosen as the tuner counts them" in out
    # A newer daemon lists a new value first: known numbers stay, the new one is next.
    tcp_buffer["published"].insert(0, published("retries", 7, counter=True))
    commands[1:1] = ["fetch bpftune.tcp_buffer.retries"]
    for _ in range(2):  # when first seen, and again from the registry after a restart
        out = dbpmda(commands, fake.path, var_dir)
        assert fetched(out, "486.10.256") == {"cubic": "3", "bbr": "9"}
        assert fetched(out, "486.10.257") == {None: "4096"}
        assert fetched(out, "486.10.258") == {None: "7"}


def with_strategy(state: dict, current: str, evaluations: dict) -> dict:
    """``state`` with a plugin tuner 'strategy' in strategy ``current``."""
    state = copy.deepcopy(state)
    example = tuner_state("strategy", 1234, [], [])
    example["strategy"] = current
    example["strategies"] = [{"name": name, "description": name, "timeout": 30,
                              "evaluation": evaluations.get(name)}
                             for name in ("strategy_A", "strategy_B")]
    state["tuners"].append(example)
    return state


def test_the_current_strategy_and_evaluations_with_stable_numbers(fake, var_dir):
    first = fake.state
    fake.state = with_strategy(first, "strategy_A", {})
    commands = ("fetch bpftune.tuner.strategy bpftune.tuner.strategy_evaluation",
                "fetch bpftune.tuner.state")
    with Dbpmda(fake.path, var_dir) as db:
        db.polled(fake)
        out = db.run(*commands, "desc bpftune.tuner.strategy_evaluation",
                     "label indom 486.2", "label item 486.1.6")
        # The fixed tuner metrics keep their numbers (strategy is item 2); the evaluations
        # are item 6, per <tuner>/<strategy>, none before the first evaluation.
        assert fetched(out, "486.1.2") == {"strategy": '"strategy_A"'}
        assert fetched(out, "486.1.6") == {}
        assert fetched(out, "486.1.0")["tcp_buffer"] == '"active"'
        assert "Data Type: double  InDom: 486.2 0x" in out
        assert "Semantics: instant  Units: none" in out

        fake.state = with_strategy(first, "strategy_B", {"strategy_A": 0.0, "strategy_B": 1.0})
        db.polled(fake)
        out = db.run(*commands)
        assert fetched(out, "486.1.2") == {"strategy": '"strategy_B"'}
        assert fetched(out, "486.1.6") == {"strategy/strategy_A": "0",
                                           "strategy/strategy_B": "1"}
        out = db.run("label instances 486.2")
        assert '"strategy/strategy_B"' in db.run("instance 486.2")
        assert re.search(r'Labels inst: 1\n\s+strategy="strategy_B"\n\s+tuner="strategy"', out)
