import os

import pytest
import torch

from course_utils.runtime import (
    BUDGETS,
    Accelerator,
    CourseError,
    budget,
    by_budget,
    get_device,
    local_seed,
    seed_everything,
)


def test_budget_reads_environment(monkeypatch):
    monkeypatch.setenv("COURSE_BUDGET", "classroom")
    assert budget() == "classroom"
    monkeypatch.setenv("COURSE_BUDGET", " FULL ")
    assert budget() == "full"
    assert budget("smoke") == "smoke"  # the argument wins


def test_budget_default_depends_on_cuda(monkeypatch):
    monkeypatch.delenv("COURSE_BUDGET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert budget() == "classroom"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert budget() == "full"


def test_bad_budget_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("COURSE_BUDGET", "huge")
    with pytest.raises(CourseError, match="smoke, classroom, full"):
        budget()


def test_by_budget_picks_one_column():
    for column, name in enumerate(BUDGETS):
        cfg = by_budget(name, epochs=(1, 5, 30), subset=(256, None, None))
        assert cfg.epochs == (1, 5, 30)[column]
        assert cfg.subset == (256, None, None)[column]
        assert cfg.budget == name
    with pytest.raises(ValueError, match="triple"):
        by_budget("smoke", epochs=(1, 2))


def test_seed_everything_repeats_draws():
    seed_everything(3)
    a = torch.randn(5)
    seed_everything(3)
    assert torch.equal(a, torch.randn(5))


def test_get_device_order(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert get_device().type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert get_device().type == "cpu"
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device().type == "cpu"


def test_cpu_stays_fp32():
    accel = Accelerator.for_device("cpu")
    assert accel.autocast_dtype is None and not accel.channels_last and not accel.can_compile


def test_local_seed_repeats_inside_and_restores_outside():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with local_seed(7):
        first = torch.rand(3)
    with local_seed(7):
        again = torch.rand(3)
    assert torch.equal(first, again)
    assert torch.equal(torch.rand(3), expected_next), "the caller's random state was disturbed"


def test_threads_are_the_cores_other_programs_leave_free(monkeypatch):
    from course_utils.runtime import choose_threads

    monkeypatch.delenv("COURSE_THREADS", raising=False)
    assert choose_threads(cores=2, load=0.2) == 2      # quiet: every core
    assert choose_threads(cores=2, load=1.1) == 1      # one core busy: one thread (2x faster there)
    assert choose_threads(cores=2, load=7.0) == 1      # never fewer than one
    assert choose_threads(cores=16, load=3.4) == 13
    monkeypatch.setenv("COURSE_THREADS", "3")
    assert choose_threads(cores=2, load=5.0) == 3      # the override wins
    monkeypatch.setenv("COURSE_THREADS", "many")
    with pytest.raises(CourseError, match="COURSE_THREADS"):
        choose_threads()


def test_a_lagging_load_average_does_not_cost_a_thread(monkeypatch):
    from course_utils import runtime

    monkeypatch.delenv("COURSE_THREADS", raising=False)
    # just after another program stopped: the one-minute average still says 1.5, the cores are idle
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.5, 1.2, 1.0))
    monkeypatch.setattr(runtime, "cores_busy_now", lambda: 0.1)
    assert runtime.choose_threads(cores=2) == 2
    # another program busy right now and over the last minute: one thread
    monkeypatch.setattr(runtime, "cores_busy_now", lambda: 1.0)
    assert runtime.choose_threads(cores=2) == 1
    # a burst that the minute's average has not seen yet does not take a core either
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert runtime.choose_threads(cores=2) == 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_cores_busy_now_is_a_share_of_the_cores():
    from course_utils.runtime import cores_busy_now

    busy = cores_busy_now(0.05)
    assert busy is not None and 0.0 <= busy <= os.cpu_count()


def test_configure_threads_respects_a_hand_set_omp_num_threads(monkeypatch):
    import torch

    from course_utils import runtime

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.delenv("COURSE_THREADS", raising=False)
        torch.set_num_threads(2)
        assert runtime.configure_threads() == 2
        monkeypatch.setenv("COURSE_THREADS", "1")
        assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
