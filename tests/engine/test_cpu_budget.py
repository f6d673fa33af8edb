"""Threads follow the container's cgroup CPU limit (v2 cpu.max, v1 quota/period), read from fake cgroup files."""

import logging
import os

import pytest

from backfill.pipeline import ThreadBudget, cgroup_cpu_limit, cpu_budget


def v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def v1(tmp_path, quota, period, folder="cpu,cpuacct"):
    d = tmp_path / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


@pytest.fixture(autouse=True)
def _no_real_proc_cgroup(monkeypatch, tmp_path):
    """Tests name their own /proc/self/cgroup; the machine's must not leak in."""
    import backfill.pipeline as pipeline

    monkeypatch.setattr(pipeline, "PROC_CGROUP", str(tmp_path / "no-proc-self-cgroup"))


@pytest.fixture
def eight_cpus(monkeypatch):
    """A process whose affinity mask holds 8 CPUs, like a pod on a big shared node."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


def test_v2_quota_over_period(tmp_path):
    assert cgroup_cpu_limit(v2(tmp_path, "250000 100000\n")) == 2.5


def test_v2_max_is_unlimited(tmp_path):
    assert cgroup_cpu_limit(v2(tmp_path, "max 100000\n")) is None


@pytest.mark.parametrize("folder", ["cpu", "cpu,cpuacct", ""])
def test_v1_quota_and_period(tmp_path, folder):
    assert cgroup_cpu_limit(v1(tmp_path, 300000, 100000, folder)) == 3.0


def test_v1_minus_one_is_unlimited(tmp_path):
    assert cgroup_cpu_limit(v1(tmp_path, -1, 100000)) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None


def test_budget_is_the_limit_not_the_node(tmp_path, eight_cpus):
    assert cpu_budget(v2(tmp_path, "200000 100000")) == 2
    assert cpu_budget(tmp_path / "nowhere") == 8


def test_fractional_limit_rounds_down_but_never_to_zero(tmp_path, eight_cpus):
    assert cpu_budget(v2(tmp_path, "250000 100000")) == 2
    assert cpu_budget(v2(tmp_path, "50000 100000")) == 1


def test_limit_above_affinity_keeps_affinity(tmp_path, eight_cpus):
    assert cpu_budget(v1(tmp_path, 1600000, 100000)) == 8


def test_malformed_file_is_ignored_with_a_warning_naming_it(tmp_path, eight_cpus, caplog):
    with caplog.at_level(logging.WARNING, logger="backfill.pipeline"):
        assert cpu_budget(v2(tmp_path, "lots 100000")) == 8
    assert str(tmp_path / "cpu.max") in caplog.text and "ignoring the CPU limit" in caplog.text


def test_one_budget_sets_torch_faiss_and_decode(monkeypatch):
    import faiss
    import torch

    before_torch = torch.get_num_threads()
    try:
        budget = ThreadBudget.resolve(cpus=3).apply()
        assert (budget.torch, budget.decode, budget.faiss) == (3, 3, 3)
        assert torch.get_num_threads() == 3
        assert faiss.omp_get_max_threads() == 3
        # explicit settings win over the budget
        assert ThreadBudget.resolve(torch_threads=1, decode_workers=5, cpus=3) == ThreadBudget(
            cpus=3, torch=1, decode=5, faiss=3
        )
    finally:
        torch.set_num_threads(before_torch)
        faiss.omp_set_num_threads(before_torch)


def test_budget_reads_the_cgroup_by_default(monkeypatch, tmp_path, eight_cpus):
    import backfill.pipeline as pipeline

    monkeypatch.setattr(pipeline, "CGROUP_ROOT", str(v2(tmp_path, "400000 100000")))
    assert ThreadBudget.resolve() == ThreadBudget(cpus=4, torch=4, decode=4, faiss=4)


def cgroup_file(root, rel, name, text):
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def proc_cgroup(tmp_path, text):
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


def test_v2_limit_of_the_own_cgroup_below_a_host_root(tmp_path):
    """As on a runner without a private cgroup namespace: /sys/fs/cgroup is the host's root,
    /proc/self/cgroup names the process's folder, and the limit is set there or above."""
    root = tmp_path / "cgroup"
    cgroup_file(root, "kubepods/pod1", "cpu.max", "400000 100000\n")
    cgroup_file(root, "kubepods/pod1/ctr", "cpu.max", "150000 100000\n")
    cgroup_file(root, "kubepods", "cpu.max", "max 100000\n")
    proc = proc_cgroup(tmp_path, "0::/kubepods/pod1/ctr\n")
    assert cgroup_cpu_limit(root, proc) == 1.5  # the tightest of container, pod and above


def test_v2_leaf_without_cpu_max_takes_the_parent(tmp_path):
    # the layout seen on the H100 device runner: the leaf has no cpu controller, the parent says "max"
    root = tmp_path / "cgroup"
    (root / "process_api" / "899dd").mkdir(parents=True)
    cgroup_file(root, "process_api", "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(root, proc_cgroup(tmp_path, "0::/process_api/899dd\n")) is None
    cgroup_file(root, "process_api", "cpu.max", "300000 100000\n")
    assert cgroup_cpu_limit(root, proc_cgroup(tmp_path, "0::/process_api/899dd\n")) == 3.0


def test_v1_limit_of_the_own_cgroup(tmp_path):
    root = tmp_path / "cgroup"
    for rel, quota in (("cpu,cpuacct/kubepods/pod2", "600000"), ("cpu,cpuacct/kubepods/pod2/ctr", "-1")):
        cgroup_file(root, rel, "cpu.cfs_quota_us", quota)
        cgroup_file(root, rel, "cpu.cfs_period_us", "100000")
    proc = proc_cgroup(tmp_path, "12:memory:/kubepods/pod2/ctr\n4:cpu,cpuacct:/kubepods/pod2/ctr\n")
    assert cgroup_cpu_limit(root, proc) == 6.0


def test_thread_budget_applies_without_faiss_installed(monkeypatch):
    # an embedding-only image (the GPU bench machine) has torch but no FAISS: embed_shard
    # applies the budget and must not fail on the import (found on the H100 run)
    import sys

    import torch

    from backfill.pipeline import ThreadBudget

    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    before = torch.get_num_threads()
    try:
        budget = ThreadBudget.resolve(torch_threads=1, cpus=2).apply()
        assert budget.torch == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
