"""The chaos run's load on a real appliance stack: without a fault every request succeeds and the audit finds nothing
lost; the misbehaving models fail only with documented errors, and still nothing is lost."""

from collections.abc import Iterator

import pytest

from appliance import devstack
from tests.appliance_stack import ApplianceStack, start_stack
from tests.backends import FakeBackend
from tests.chaos.audit import audit
from tests.chaos.load import CHAT, CUT, LIMITED, MISBEHAVING, STACK_SETTINGS, STALL, Stats, Traffic, World, prepare
from tests.support.waiting import eventually
from tests.webhook_receiver import Receiver

MIN_PER_KIND = 12  # requests of each kind a run waits for: enough that every caller sent each kind a few times
EXPECTED_CODES = {CUT: "BACKEND_ERROR", STALL: "BACKEND_TIMEOUT", LIMITED: "BACKEND_RATE_LIMITED"}
FINDINGS = ("usage_missing", "usage_doubled", "events_lost", "objects_corrupt", "usage_unmatched")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB, redis_server: devstack.Redis,
          s3_server: devstack.S3Server) -> Iterator[ApplianceStack]:
    running = start_stack(tmp_path_factory.mktemp("chaos"), mariadb, redis_server, s3_server, **STACK_SETTINGS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def world(stack: ApplianceStack) -> Iterator[World]:
    fake, receiver = FakeBackend().start(), Receiver().start()
    try:
        yield prepare(stack, fake, receiver)
    finally:
        receiver.stop()
        fake.stop()


def counted(traffic: Traffic, wanted: dict[str, int], by: str) -> bool:
    stats = traffic.stats()
    counts = stats.by_kind if by == "kind" else stats.by_model
    return all(sum(counts.get(name, {}).values()) >= least for name, least in wanted.items())


def findings(report: dict[str, object]) -> dict[str, object]:
    return {name: report[name] for name in FINDINGS}


@pytest.mark.timeout(300)
def test_a_steady_load_without_faults_succeeds_and_loses_nothing(world: World):
    traffic = Traffic(world, concurrency=8, rate_per_s=15, seed=1).start()
    try:
        wanted = {kind: MIN_PER_KIND for kind in ("chat", "chat_stream", "native_chat", "native_stream",
                                                   "storage_put", "storage_get")}
        eventually(lambda: counted(traffic, wanted, "kind"), "each kind of request sent", 120, interval_s=0.5)
    finally:
        records = traffic.stop()
    stats = Stats.of(records)
    assert (stats.failed_documented, stats.failed_other) == (0, 0), stats
    assert stats.succeeded == stats.attempted
    assert {record.caller for record in records} == set(range(len(world.callers)))  # every key sent some
    report = audit(world.stack, world, records)
    assert findings(report) == dict.fromkeys(FINDINGS, 0), report
    assert report["objects_checked"] == len([r for r in records if r.kind == "storage_put"])


@pytest.mark.timeout(300)
def test_misbehaving_models_fail_with_documented_errors_only(world: World):
    traffic = Traffic(world, concurrency=8, rate_per_s=15, seed=2).start()
    try:
        traffic.mix({CUT: 0.2, STALL: 0.1, LIMITED: 0.2})
        eventually(lambda: counted(traffic, {CHAT: MIN_PER_KIND} | dict.fromkeys(MISBEHAVING, 6), "model"),
                   "requests to every misbehaving model", 180, interval_s=0.5)
        traffic.mix()
    finally:
        records = traffic.stop()
    stats = Stats.of(records)
    assert stats.failed_other == 0, stats
    for model in MISBEHAVING:  # each answers with its documented error, never a success
        assert stats.by_model[model] == {"failed_documented": sum(stats.by_model[model].values())}, stats
    assert set(stats.by_model[CHAT]) == {"succeeded"}, stats
    # Each model's own error; MODEL_UNAVAILABLE once its backend's circuit breaker opens.
    for model, code in EXPECTED_CODES.items():
        assert {r.error_code for r in records if r.model == model} <= {code, "MODEL_UNAVAILABLE"}, stats.codes
        assert any(r.error_code == code for r in records if r.model == model), stats.codes
    # A stream that broke or stalled after its first chunk: a 200 ending with an error frame, never a silent cut.
    broke_after_start = {(r.model, r.error_code) for r in records if r.kind.endswith("stream") and r.status == 200}
    assert {(CUT, "BACKEND_ERROR"), (STALL, "BACKEND_TIMEOUT")} <= broke_after_start, broke_after_start
    report = audit(world.stack, world, records)
    assert findings(report) == dict.fromkeys(FINDINGS, 0), report
