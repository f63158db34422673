"""The worker's housekeeping jobs, run the way an operator runs one now: `scaigrid job run NAME`."""

from datetime import UTC, datetime, timedelta

from tests.catalogue_fixtures import sql
from tests.support.env import create_key
from tests.support.processes import scaigrid


def _ago(days: float) -> datetime:
    return datetime.now(UTC).replace(tzinfo=None) - timedelta(days=days)


def _add_usage(env: dict[str, str], request_id: str, created_at: datetime, tenant_id: str = "ten_x",
               user_id: str | None = None) -> None:
    sql(env, "INSERT INTO usage_records (request_id, created_at, partner_id, tenant_id, user_id, model, protocol, "
             "status) VALUES (:id, :at, 'prt_x', :tenant, :user, 'acme/chat', 'native', 'ok')",
        id=request_id, at=created_at, tenant=tenant_id, user=user_id)


def _add_total_budget(env: dict[str, str], scope: str, scope_id: str) -> None:
    sql(env, "INSERT INTO budgets (id, scope, scope_id, partner_id, period, limit_type, limit_value) "
             "VALUES (:id, :scope, :scope_id, 'prt_x', 'total', 'cost', 10)",
        id=f"bud_{scope}_{scope_id}", scope=scope, scope_id=scope_id)


def test_job_list_names_every_job_with_its_schedule(migrated_env):
    result = scaigrid("job", "list", env=migrated_env)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "cron 17 3 * * *" in lines["usage_retention"]
    assert "cron 41 * * * *" in lines["api_key_purge"]
    assert "every 30 s" in lines["usage_flush"]
    assert "every worker" in lines["worker_heartbeat"]


def test_usage_retention_deletes_only_records_older_than_the_setting(migrated_env):
    env = {**migrated_env, "USAGE_RETENTION_DAYS": "30"}
    _add_usage(env, "req_old", _ago(31))
    _add_usage(env, "req_recent", _ago(29))
    result = scaigrid("job", "run", "usage_retention", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("usage_retention: ok")
    assert [row[0] for row in sql(env, "SELECT request_id FROM usage_records")] == ["req_recent"]


def test_usage_retention_keeps_what_a_total_budget_still_counts(migrated_env):
    # A total budget is recounted from every record of its scope after Redis loses its counters.
    env = {**migrated_env, "USAGE_RETENTION_DAYS": "30"}
    _add_total_budget(env, "tenant", "ten_budgeted")
    _add_total_budget(env, "user", "usr_budgeted")
    _add_usage(env, "req_tenant_budget", _ago(400), tenant_id="ten_budgeted")
    _add_usage(env, "req_user_budget", _ago(400), user_id="usr_budgeted")
    _add_usage(env, "req_other_user", _ago(400), user_id="usr_other")
    _add_usage(env, "req_no_budget", _ago(400))
    assert scaigrid("job", "run", "usage_retention", env=env).returncode == 0
    assert sorted(row[0] for row in sql(env, "SELECT request_id FROM usage_records")) == [
        "req_tenant_budget", "req_user_budget"]


def test_api_key_purge_deletes_keys_dead_longer_than_the_retention(migrated_env):
    env = {**migrated_env, "API_KEY_RETENTION_DAYS": "7"}
    for _ in range(4):
        create_key(env, "tenant_user")
    ids = [row[0] for row in sql(env, "SELECT id FROM api_keys ORDER BY id")]
    expired_long_ago, revoked_long_ago, expired_recently, alive = ids
    sql(env, "UPDATE api_keys SET expires_at = :at WHERE id = :id", at=_ago(8), id=expired_long_ago)
    sql(env, "UPDATE api_keys SET revoked_at = :at WHERE id = :id", at=_ago(8), id=revoked_long_ago)
    sql(env, "UPDATE api_keys SET expires_at = :at WHERE id = :id", at=_ago(1), id=expired_recently)
    result = scaigrid("job", "run", "api_key_purge", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(row[0] for row in sql(env, "SELECT id FROM api_keys")) == sorted([expired_recently, alive])


def test_job_run_refuses_an_unknown_job(migrated_env):
    result = scaigrid("job", "run", "no_such_job", env=migrated_env)
    assert result.returncode == 1
    assert "no job 'no_such_job'" in result.stderr and "usage_retention" in result.stderr

