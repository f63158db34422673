"""Job declarations and tick arithmetic (the worker's behaviour itself is tested in test_modes)."""

import pytest

from scaigrid.worker.jobs import Job


async def noop(ctx) -> None:
    return None


def test_a_job_needs_exactly_one_schedule():
    with pytest.raises(ValueError, match="exactly one of every_s and cron"):
        Job("both", noop, every_s=10, cron="* * * * *")
    with pytest.raises(ValueError, match="exactly one of every_s and cron"):
        Job("neither", noop)


@pytest.mark.parametrize(("now_s", "tick"), [(1000.0, 1000), (1000.4, 1000), (999.999, 1000), (1004.9, 1000),
                                             (1005.1, 1010)])
def test_tick_is_the_nearest_scheduled_time(now_s, tick):
    # A timer firing just early or a little late belongs to the same tick on every worker.
    assert Job("j", noop, every_s=10).tick_for(now_s) == tick


def test_cron_jobs_tick_per_minute():
    assert Job("c", noop, cron="*/5 * * * *").tick_for(120.2) == 120
