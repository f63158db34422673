"""Settings: precedence, validation with one clear line, secrets masked, the production auth refusal."""

import re
from pathlib import Path

import pytest

from appliance import devstack
from scaigrid.resources import redis_ctx
from scaigrid.settings import ConfigError, entries, load_settings, parse_redis_url
from tests.support.processes import REPO, scaigrid

MINIMAL = {"DATABASE_URL": "mysql+asyncmy://scaigrid:s3cr3t-pw@db.example:3306/scaigrid",
           "REDIS_URL": "redis://:r3dis-pw@redis.example:6379/0"}


def test_defaults_match_the_documented_ones():
    settings = load_settings({}, env_file=None)
    assert settings.dispatch.stream_timeout_s == 600
    assert (settings.server.http_port, settings.server.grpc_port, settings.server.bunker_proxy_port) == (
        8000, 50051, 8001)
    assert settings.app_env == "production" and settings.auth_disabled is False
    assert settings.modules == ("scaibunker",)


def test_environment_wins_over_env_file_which_wins_over_defaults(tmp_path: Path):
    env_file = tmp_path / "scaigrid.env"
    env_file.write_text("# comment\nHTTP_PORT=9000\nGRPC_PORT='9001'\nexport APP_LOG_LEVEL=debug\n\n")
    settings = load_settings({"GRPC_PORT": "9002"}, env_file=env_file)
    assert settings.server.http_port == 9000  # from the file
    assert settings.server.grpc_port == 9002  # environment over file
    assert settings.log_level == "debug"
    assert settings.server.bunker_proxy_port == 8001  # default


@pytest.mark.parametrize(("env", "message"), [
    ({"HTTP_PORT": "eighty"}, "HTTP_PORT: expected a port number 1-65535, got 'eighty'"),
    ({"HTTP_PORT": "70000"}, "HTTP_PORT: expected a port number 1-65535"),
    ({"DATABASE_URL": "postgresql://u:p@h/db"}, "DATABASE_URL: expected mysql+asyncmy://user:password@host:3306/database"),
    ({"REDIS_URL": "redis+sentinel://h1/"}, "REDIS_URL: expected redis+sentinel://"),
    ({"APP_ENV": "prod"}, "APP_ENV: expected one of development, test, staging, production, got 'prod'"),
    ({"DISPATCH_STREAM_TIMEOUT_S": "-1"}, "DISPATCH_STREAM_TIMEOUT_S: expected a number of seconds > 0"),
    ({"SCAIGRID_AUTH_DISABLED": "maybe"}, "SCAIGRID_AUTH_DISABLED: expected true or false"),
    ({"SCAIGRID_MODULES": "scai bunker"}, "SCAIGRID_MODULES: expected comma-separated module ids"),
])
def test_a_wrong_value_names_the_variable_and_what_is_expected(env, message):
    with pytest.raises(ConfigError) as caught:
        load_settings(env, env_file=None)
    assert str(caught.value).startswith(message)


def test_a_wrong_secret_is_not_echoed():
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATABASE_URL": "postgres://admin:hunter2@db/x"}, env_file=None)
    assert "hunter2" not in str(caught.value)


def test_auth_disabled_is_refused_in_production_and_allowed_in_development():
    with pytest.raises(ConfigError, match="SCAIGRID_AUTH_DISABLED: must not be true when APP_ENV=production"):
        load_settings({"SCAIGRID_AUTH_DISABLED": "true"}, env_file=None)
    assert load_settings({"SCAIGRID_AUTH_DISABLED": "true", "APP_ENV": "development"}, env_file=None).auth_disabled


def test_production_needs_an_https_jwks_and_an_issuer_development_and_test_do_not():
    plain = {"SCAIKEY_JWKS_URL": "http://scaikey.example/.well-known/jwks.json", "SCAIKEY_ISSUER": "https://scaikey"}
    with pytest.raises(ConfigError) as caught:
        load_settings(plain, env_file=None)
    assert str(caught.value).startswith("SCAIKEY_JWKS_URL: must be https when APP_ENV=production")
    with pytest.raises(ConfigError) as caught:
        load_settings({"SCAIKEY_JWKS_URL": "https://scaikey.example/.well-known/jwks.json"}, env_file=None)
    assert str(caught.value).startswith("SCAIKEY_ISSUER: required when APP_ENV=production and SCAIKEY_JWKS_URL is set")
    secure = {**plain, "SCAIKEY_JWKS_URL": "https://scaikey.example/.well-known/jwks.json"}
    assert load_settings(secure, env_file=None).scaikey.issuer == "https://scaikey"
    assert load_settings({}, env_file=None).scaikey.jwks_url is None  # no ScaiKey at all: nothing required
    for app_env in ("development", "test"):
        settings = load_settings({"SCAIKEY_JWKS_URL": plain["SCAIKEY_JWKS_URL"], "APP_ENV": app_env}, env_file=None)
        assert settings.scaikey.jwks_url == plain["SCAIKEY_JWKS_URL"] and settings.scaikey.issuer is None


def test_scaiinfer_tls_settings_go_together():
    assert load_settings({}, env_file=None).scaiinfer.plaintext is False  # TLS unless opted out
    for one in ({"SCAIINFER_CLIENT_CERT_FILE": "/etc/scaigrid/tls/gateway.pem"},
                {"SCAIINFER_CLIENT_KEY_FILE": "/etc/scaigrid/tls/gateway.key"}):
        with pytest.raises(ConfigError) as caught:
            load_settings(one, env_file=None)
        assert str(caught.value).startswith("SCAIINFER_CLIENT_CERT_FILE, SCAIINFER_CLIENT_KEY_FILE: set both")
    with pytest.raises(ConfigError) as caught:
        load_settings({"SCAIINFER_PLAINTEXT": "true", "SCAIINFER_CA_FILE": "/etc/scaigrid/tls/nodes.pem"},
                      env_file=None)
    assert str(caught.value).startswith("SCAIINFER_PLAINTEXT: true, but SCAIINFER_CA_FILE")
    assert load_settings({"SCAIINFER_PLAINTEXT": "yes"}, env_file=None).scaiinfer.plaintext is True


def test_cli_refuses_a_plain_http_jwks_in_production():
    result = scaigrid("check-config", env={**MINIMAL, "SCAIKEY_JWKS_URL": "http://scaikey.example/jwks.json",
                                           "SCAIKEY_ISSUER": "https://scaikey"})
    assert result.returncode == 2
    assert result.stderr.startswith("scaigrid: configuration error: SCAIKEY_JWKS_URL: must be https when "
                                    "APP_ENV=production")


def test_objects_s3_cannot_take_in_10000_parts_are_refused():
    part = {"STORAGE_PART_SIZE_BYTES": str(5 * 1024**2)}
    with pytest.raises(ConfigError) as caught:
        load_settings({**part, "STORAGE_MAX_OBJECT_BYTES": str(10_000 * 5 * 1024**2 + 1)}, env_file=None)
    assert str(caught.value).startswith(
        "STORAGE_MAX_OBJECT_BYTES: must be at most 10000 x STORAGE_PART_SIZE_BYTES")
    at_limit = load_settings({**part, "STORAGE_MAX_OBJECT_BYTES": str(10_000 * 5 * 1024**2)}, env_file=None)
    assert at_limit.storage.max_object_bytes == 10_000 * 5 * 1024**2


def test_secrets_are_masked_in_repr_and_entries():
    settings = load_settings({**MINIMAL, "S3_SECRET_ACCESS_KEY": "s3-secret-key", "JWT_SIGNING_SECRET": "jwt-secret",
                              "SCAIKEY_WEBHOOK_SECRET": "hook-secret"}, env_file=None)
    shown = repr(settings) + "\n".join(e.display() for e in entries(settings))
    for secret in ("s3cr3t-pw", "r3dis-pw", "s3-secret-key", "jwt-secret", "hook-secret"):
        assert secret not in shown
    assert "mysql+asyncmy://scaigrid:********@db.example:3306/scaigrid" in shown
    assert settings.database.url.reveal() == MINIMAL["DATABASE_URL"]


def test_sentinel_url_forms():
    target = parse_redis_url("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/2")
    assert target.sentinels == (("s1", 26379), ("s2", 26380))
    assert (target.master, target.db, target.password) == ("mymaster", 2, "pw")
    assert parse_redis_url("redis+sentinel://s1:26379/mymaster").db == 0


async def test_sentinel_url_reaches_the_master_through_a_real_sentinel(tmp_path: Path):
    master = devstack.start_redis(tmp_path / "master")
    sentinel = devstack.start_sentinel(tmp_path / "sentinel", master, master_name="scaigrid")
    try:
        settings = load_settings({"REDIS_URL": sentinel.url}, env_file=None)
        async with redis_ctx(settings) as client:
            await client.set("through-sentinel", "yes")
        async with redis_ctx(load_settings({"REDIS_URL": master.url}, env_file=None)) as direct:
            assert await direct.get("through-sentinel") == b"yes"
    finally:
        sentinel.stop()
        master.stop()


def documented_default(default: object) -> str:
    """A declared default as the README's table shows it: in backticks, booleans lower-case, 30.0 as 30."""
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    if isinstance(default, tuple):
        default = ",".join(default)
    return f"`{default}`"


def test_the_readme_table_is_the_declarations():
    """Each row says what the code declares: same variables in the same order, same default, same meaning."""
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| (.*?) \| (.*) \|$", readme, re.MULTILINE)
    assert [env for env, _, _ in rows] == [e.env for e in entries()]
    for (env, default, meaning), entry in zip(rows, entries(), strict=True):
        if entry.default is None:
            # No default: optional (—), or required by some modes (the footnotes under the table say which).
            assert re.fullmatch(r"—|required[¹²³]", default), (env, default)
        else:
            assert default == documented_default(entry.default), env
        assert meaning == entry.help + ("; secret" if entry.secret else ""), env


# --- the command line, as an operator meets it ---

def test_cli_config_error_is_one_line_and_exit_2():
    result = scaigrid("run", "--mode", "http", env={"HTTP_PORT": "x", **MINIMAL})
    assert result.returncode == 2
    assert result.stderr.strip() == "scaigrid: configuration error: HTTP_PORT: expected a port number 1-65535, got 'x'"
    assert "Traceback" not in result.stderr


def test_cli_missing_required_setting_names_it():
    result = scaigrid("run", "--mode", "worker", env={"DATABASE_URL": MINIMAL["DATABASE_URL"]})
    assert result.returncode == 2
    assert result.stderr.strip() == "scaigrid: configuration error: REDIS_URL: required by mode worker, but not set"


def test_cli_refuses_auth_disabled_in_production():
    result = scaigrid("run", "--mode", "http", env={**MINIMAL, "SCAIGRID_AUTH_DISABLED": "true"})
    assert result.returncode == 2
    assert "SCAIGRID_AUTH_DISABLED: must not be true when APP_ENV=production" in result.stderr


def test_cli_mode_comes_from_scaigrid_mode():
    result = scaigrid("run", env={"SCAIGRID_MODE": "grpc", "DATABASE_URL": MINIMAL["DATABASE_URL"]})
    assert result.stderr.strip() == "scaigrid: configuration error: REDIS_URL: required by mode grpc, but not set"
    assert scaigrid("run", env={}).stderr.strip().startswith("scaigrid: configuration error: SCAIGRID_MODE: required")


def test_check_config_prints_effective_settings_with_secrets_masked(tmp_path: Path):
    env_file = tmp_path / "scaigrid.env"
    env_file.write_text("S3_SECRET_ACCESS_KEY=very-secret-s3\nHTTP_PORT=8080\n")
    result = scaigrid("--env-file", str(env_file), "check-config", env={**MINIMAL, "JWT_SIGNING_SECRET": "jwt-x"})
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert lines["HTTP_PORT"] == "8080"
    assert lines["S3_SECRET_ACCESS_KEY"] == "********"
    assert lines["JWT_SIGNING_SECRET"] == "********"
    assert lines["DATABASE_URL"] == "mysql+asyncmy://scaigrid:********@db.example:3306/scaigrid"
    for secret in ("very-secret-s3", "jwt-x", "s3cr3t-pw", "r3dis-pw"):
        assert secret not in result.stdout + result.stderr


def test_check_config_fails_with_2_on_a_bad_value():
    result = scaigrid("check-config", env={"GRPC_PORT": "0"})
    assert result.returncode == 2
    assert result.stderr.startswith("scaigrid: configuration error: GRPC_PORT")


def test_unreadable_env_file_is_a_config_error(tmp_path: Path):
    result = scaigrid("--env-file", str(tmp_path / "missing.env"), "check-config", env={})
    assert result.returncode == 2
    assert "missing.env: cannot read env file" in result.stderr


def test_malformed_env_file_line_is_named(tmp_path: Path):
    env_file = tmp_path / "bad.env"
    env_file.write_text("HTTP_PORT=8000\nthis is not a setting\n")
    with pytest.raises(ConfigError, match=r"bad.env:2: expected KEY=VALUE"):
        load_settings({}, env_file=env_file)


def test_version_and_python_dash_m():
    result = scaigrid("version", env={})
    assert result.returncode == 0
    assert re.fullmatch(r"\d+\.\d+\.\d+\n", result.stdout)




def test_check_worker_without_redis_names_the_variable():
    result = scaigrid("check", "worker", env={})
    assert result.returncode == 2
    assert result.stderr.strip() == "scaigrid: configuration error: REDIS_URL: required by this command, but not set"


def test_check_config_names_an_unknown_module():
    result = scaigrid("check-config", env={"SCAIGRID_MODULES": "scaibunker,scaibunkr"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "scaigrid: configuration error: SCAIGRID_MODULES: unknown module 'scaibunkr' (built-in: scaibunker)")
