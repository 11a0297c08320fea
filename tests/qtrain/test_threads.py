"""qtrain.threads: torch gets every core while the machine is idle, a core fewer per core of other work."""

from __future__ import annotations

import pytest
import torch

from qtrain.threads import ThreadGovernor, machine_cpu_seconds


class Machine:
    """A fake clock and CPU-time counters: `run(seconds, ours=cores, others=cores)` advances them."""

    def __init__(self):
        self.now, self.busy, self.own = 0.0, 1000.0, 10.0

    def run(self, seconds: float, ours: float, others: float) -> None:
        self.now += seconds
        self.own += seconds * ours
        self.busy += seconds * (ours + others)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def governor(machine: Machine, setting=None, cores=4) -> ThreadGovernor:
    return ThreadGovernor(setting, interval=5.0, clock=lambda: machine.now, machine_seconds=lambda: machine.busy,
                          own_seconds=lambda: machine.own, cores=cores)  # fmt: skip


def test_idle_machine_keeps_every_core():
    m = Machine()
    g = governor(m)
    assert g.threads == 4 == torch.get_num_threads()
    m.run(6, ours=3.9, others=0.1)
    assert g.tick() == 4 and g.describe() == "4 CPU threads, adaptive"


def test_other_work_takes_a_core_each_and_gives_it_back():
    m = Machine()
    g = governor(m)
    m.run(6, ours=3.2, others=0.8)  # one busy process beside us
    assert g.tick() == 3 == torch.get_num_threads()
    m.run(6, ours=2.0, others=2.0)  # and a second one
    assert g.tick() == 2
    m.run(6, ours=2.0, others=4.0)  # more than we have: one thread stays
    assert g.tick() == 1
    m.run(6, ours=1.0, others=0.0)  # they stopped
    assert g.tick() == 4 == torch.get_num_threads()


def test_decides_only_once_an_interval_has_passed():
    m = Machine()
    g = governor(m)
    m.run(2, ours=2.0, others=2.0)
    assert g.tick() == 4  # 2 s of 5: not yet measured
    m.run(4, ours=2.0, others=2.0)
    assert g.tick() == 2  # measured over all 6 s


@pytest.mark.parametrize("setting, threads", [(0, 4), (3, 3)])
def test_a_fixed_setting_never_changes(setting, threads):
    m = Machine()
    g = governor(m, setting)
    m.run(6, ours=1.0, others=3.0)
    assert g.tick() == threads == torch.get_num_threads()
    assert g.describe() == f"{threads} CPU threads, " + ("torch's default" if setting == 0 else "train.threads")


def test_without_proc_stat_torchs_default_stays():
    g = ThreadGovernor(None, machine_seconds=lambda: None, cores=2)
    assert g.tick() == 2 and g.other_cores() is None


def test_machine_cpu_seconds_reads_this_linux_machine():
    busy = machine_cpu_seconds()
    assert busy is None or busy > 0
