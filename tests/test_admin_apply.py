"""`scaigrid admin apply FILE.toml`: idempotent upsert of the catalogue, all or nothing, secrets kept secret."""

import json
from pathlib import Path

import pytest
import redis as sync_redis
from cryptography.fernet import Fernet

from scaigrid.cache import CHANNEL
from tests.catalogue_fixtures import add_tenant, sql
from tests.support.processes import REPO, scaigrid

SECRET = "sk-test-0123456789abcdef"
ROTATED = "sk-rotated-key-000000000000"

CATALOGUE = f"""
[[backends]]
id = "vllm-a"
provider = "custom"
base_url = "http://127.0.0.1:8080/v1/"
model = "meta-llama/Llama-3.3-70B-Instruct"
api_key = "{SECRET}"
cost_input_per_mtok = "0.10"
cost_output_per_mtok = "0.20"
timeout_s = 60

[[backends]]
id = "openai-b"
provider = "openai"
base_url = "https://api.openai.com/v1"
model = "gpt-4o"
api_key_env = "SCAIGRID_BACKEND_KEY_OPENAI"
cost_input_per_mtok = "2.50"
cost_output_per_mtok = "10"

[[models]]
slug = "scailabs/poolnoodle-omni"
display_name = "Poolnoodle Omni"
modality = "chat"
context_window = 128000
max_output_tokens = 4096
price_input_per_mtok = "2.50"
price_output_per_mtok = "10.00"
default_params = {{ temperature = 0.7 }}
routes = [ {{ backend = "vllm-a", weight = 3, priority = 1 }}, {{ backend = "openai-b", weight = 1, priority = 2 }} ]
"""

ACME_GPU = """
[[backends]]
id = "acme-gpu"
provider = "custom"
base_url = "http://127.0.0.1:8081/v1"
model = "llama"
tenant = "acme"
"""


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """acme's backends here name 127.0.0.1 and are never called: the operator allows private targets."""
    return {**env, "BACKEND_ALLOW_PRIVATE_TARGETS": "true"}


def apply(env: dict[str, str], tmp_path: Path, text: str, name: str = "catalogue.toml") -> tuple[int, str, str]:
    path = tmp_path / name
    path.write_text(text)
    result = scaigrid("admin", "apply", str(path), env=env)
    return result.returncode, result.stdout, result.stderr


def routes(env: dict[str, str], slug: str) -> list[tuple[str, int, int]]:
    """(backend name, weight, priority): a tenant backend's stored key adds "@<tenant id>" to its name."""
    rows = sql(env, "SELECT SUBSTRING_INDEX(r.backend_id, '@', 1), r.weight, r.priority FROM model_routes r "
                    "JOIN models m ON m.id = r.model_id WHERE m.slug = :slug ORDER BY r.priority", slug=slug)
    return [tuple(row) for row in rows]


def test_apply_creates_then_changes_nothing_when_applied_again(migrated_env: dict[str, str], tmp_path: Path) -> None:
    code, out, err = apply(migrated_env, tmp_path, CATALOGUE)
    assert code == 0, err
    assert out.splitlines() == [
        "backend vllm-a: created", "backend openai-b: created", "model scailabs/poolnoodle-omni: created"]
    backend = sql(migrated_env, "SELECT base_url, api_key_encrypted, api_key_env, cost_input_per_mtok, timeout_s "
                                "FROM backends WHERE id = 'vllm-a'")[0]
    assert backend.base_url == "http://127.0.0.1:8080/v1"  # the trailing slash would double in {base_url}/chat/...
    assert str(backend.cost_input_per_mtok) == "0.100000" and backend.timeout_s == 60
    assert backend.api_key_env is None
    model = sql(migrated_env, "SELECT modality, context_window, default_params, price_output_per_mtok, status "
                              "FROM models WHERE slug = 'scailabs/poolnoodle-omni'")[0]
    assert (model.modality, model.context_window, model.status) == ("chat", 128000, "active")
    assert json.loads(model.default_params) == {"temperature": 0.7}
    assert routes(migrated_env, "scailabs/poolnoodle-omni") == [("vllm-a", 3, 1), ("openai-b", 1, 2)]
    stamps = sql(migrated_env, "SELECT id, updated_at, api_key_encrypted FROM backends ORDER BY id")

    code, out, err = apply(migrated_env, tmp_path, CATALOGUE)
    assert code == 0, err
    assert out.splitlines() == [
        "backend vllm-a: unchanged", "backend openai-b: unchanged", "model scailabs/poolnoodle-omni: unchanged"]
    # Unchanged means unwritten: the same ciphertext, not a fresh encryption of the same key.
    assert sql(migrated_env, "SELECT id, updated_at, api_key_encrypted FROM backends ORDER BY id") == stamps


def test_the_same_names_for_two_owners_are_two_items_applied_idempotently(migrated_env: dict[str, str],
                                                                          tmp_path: Path) -> None:
    add_tenant(migrated_env, "acme")
    text = "".join(f"""
[[backends]]
id = "vllm-1"
provider = "custom"
base_url = "http://127.0.0.1:808{index}/v1"
model = "llama"
{owner}
[[models]]
slug = "shared/name"
modality = "chat"
routes = [ {{ backend = "vllm-1" }} ]
{owner}
""" for index, owner in enumerate(("", 'tenant = "acme"')))
    code, out, err = apply(migrated_env, tmp_path, text)
    assert (code, out.splitlines()) == (0, ["backend vllm-1: created"] * 2 + ["model shared/name: created"] * 2), err
    owners = sql(migrated_env, "SELECT t.slug, b.base_url FROM model_routes r JOIN models m ON m.id = r.model_id "
                               "JOIN backends b ON b.id = r.backend_id LEFT JOIN tenants t ON t.id = m.tenant_id "
                               "ORDER BY t.slug")
    assert [tuple(row) for row in owners] == [(None, "http://127.0.0.1:8080/v1"), ("acme", "http://127.0.0.1:8081/v1")]
    code, out, err = apply(migrated_env, tmp_path, text)
    assert (code, out.splitlines()) == (0, ["backend vllm-1: unchanged"] * 2 + ["model shared/name: unchanged"] * 2)
    code, out, err = apply(migrated_env, tmp_path, text + text)
    assert code == 1 and err.count("defined twice in the file") == 4, err


def test_api_key_is_stored_encrypted_and_never_printed(migrated_env: dict[str, str], tmp_path: Path) -> None:
    code, out, err = apply(migrated_env, tmp_path, CATALOGUE)
    assert code == 0, err
    token = sql(migrated_env, "SELECT api_key_encrypted FROM backends WHERE id = 'vllm-a'")[0][0]
    assert SECRET not in token
    assert Fernet(migrated_env["SCAIGRID_ENCRYPTION_KEY"].encode()).decrypt(token.encode()).decode() == SECRET
    # A changed key is re-encrypted and the item reported updated; still never echoed, not even in errors.
    code, out, err = apply(migrated_env, tmp_path, CATALOGUE.replace(SECRET, ROTATED))
    assert code == 0, err
    assert "backend vllm-a: updated" in out.splitlines()
    token = sql(migrated_env, "SELECT api_key_encrypted FROM backends WHERE id = 'vllm-a'")[0][0]
    assert Fernet(migrated_env["SCAIGRID_ENCRYPTION_KEY"].encode()).decrypt(token).decode() == ROTATED
    code, out, err = apply(migrated_env, tmp_path, CATALOGUE.replace('provider = "custom"', 'provider = "nope"'))
    assert code == 1
    for text in (out, err):
        assert SECRET not in text and ROTATED not in text


def test_changes_update_only_what_changed_and_routes_are_replaced(migrated_env: dict[str, str], tmp_path: Path
                                                                  ) -> None:
    assert apply(migrated_env, tmp_path, CATALOGUE)[0] == 0
    changed = (CATALOGUE.replace('cost_output_per_mtok = "10"', 'cost_output_per_mtok = "11"')
               .replace('{ backend = "vllm-a", weight = 3, priority = 1 }, ', ""))
    code, out, err = apply(migrated_env, tmp_path, changed)
    assert code == 0, err
    assert out.splitlines() == [
        "backend vllm-a: unchanged", "backend openai-b: updated", "model scailabs/poolnoodle-omni: updated"]
    assert routes(migrated_env, "scailabs/poolnoodle-omni") == [("openai-b", 1, 2)]
    # A model without `routes` keeps the routes it has.
    without_routes = changed.rsplit("routes = ", 1)[0]
    code, out, err = apply(migrated_env, tmp_path, without_routes)
    assert code == 0, err
    assert out.splitlines()[-1] == "model scailabs/poolnoodle-omni: unchanged"
    assert routes(migrated_env, "scailabs/poolnoodle-omni") == [("openai-b", 1, 2)]


def test_any_invalid_item_writes_nothing_and_names_each_problem(migrated_env: dict[str, str], tmp_path: Path) -> None:
    bad = CATALOGUE + """
[[backends]]
id = "Bad Id"
provider = "custom"
base_url = "ftp://example"
model = "m"

[[backends]]
id = "cheap"
provider = "custom"
base_url = "http://127.0.0.1:9/v1"
model = "m"
cost_input_per_mtok = 0.1
cost_output_per_mtok = "0.0000001"
api_key = "x"
api_key_env = "SCAIGRID_BACKEND_KEY_Y"

[[models]]
slug = "acme/embed"
modality = "smell"
max_output_tokens = 0
"""
    code, out, err = apply(migrated_env, tmp_path, bad)
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    for expected in (
        "backend Bad Id: id: must match [a-z0-9][a-z0-9._-]{0,63}",
        "backend Bad Id: base_url: an http:// or https:// URL",
        "backend cheap: cost_input_per_mtok: a decimal string",
        "backend cheap: cost_output_per_mtok: at most 6 decimals",
        "backend cheap: api_key_env: give api_key or api_key_env, not both",
        "model acme/embed: modality: one of: chat, embedding, image, audio",
        "model acme/embed: max_output_tokens: a whole number 1-",
    ):
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    assert lines[-1].endswith("nothing was written")
    assert sql(migrated_env, "SELECT COUNT(*) FROM backends")[0][0] == 0  # the valid items were not written either


def test_values_that_would_break_dispatch_later_are_refused_by_apply_too(migrated_env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    """apply reads with the API's reader: TOML's nan and inf, deep tables and a key with a line break are refused."""
    deep = "{ a = " * 32 + "{}" + " }" * 32
    bad = f"""
[[backends]]
id = "crlf"
provider = "custom"
base_url = "http://127.0.0.1:9/v1"
model = "m"
api_key = "sk-abc\\r\\nX-Injected: 1"

[[models]]
slug = "acme/nan"
modality = "chat"
default_params = {{ temperature = nan }}

[[models]]
slug = "acme/inf"
modality = "chat"
default_params = {{ top_p = inf }}

[[models]]
slug = "acme/deep"
modality = "chat"
default_params = {deep}

[[models]]
slug = "acme/huge"
modality = "chat"
default_params = {{ max_tokens = 100_000_000_000_000_000 }}
"""
    code, out, err = apply(migrated_env, tmp_path, bad)
    assert code == 1 and out == "" and "Traceback" not in err
    lines = err.splitlines()
    for expected in (
        "backend crlf: api_key: control characters (line breaks included) are not allowed",
        "model acme/nan: default_params: must be an object of JSON values (no NaN or Infinity)",
        "model acme/inf: default_params: must be an object of JSON values (no NaN or Infinity)",
        "model acme/deep: default_params: nested deeper than 31 levels",
        "model acme/huge: default_params.max_tokens: an integer from 1 to 2147483647",
    ):
        assert expected in lines, (expected, lines)
    assert sql(migrated_env, "SELECT COUNT(*) FROM backends")[0][0] == 0
    assert sql(migrated_env, "SELECT COUNT(*) FROM models")[0][0] == 0


def test_problems_found_in_the_database_roll_back_the_whole_file(migrated_env: dict[str, str], tmp_path: Path) -> None:
    add_tenant(migrated_env, "acme")
    add_tenant(migrated_env, "globex")
    code, out, err = apply(migrated_env, tmp_path, ACME_GPU + """
[[backends]]
id = "lost"
provider = "custom"
base_url = "http://127.0.0.1:8082/v1"
model = "llama"
tenant = "nowhere"

[[models]]
slug = "globex/chat"
modality = "chat"
tenant = "globex"
routes = [ { backend = "acme-gpu" }, { backend = "missing" } ]

[[models]]
slug = "shared/chat"
modality = "chat"
routes = [ { backend = "acme-gpu" } ]
""")
    assert code == 1, out
    lines = err.splitlines()
    assert "backend lost: tenant: no tenant 'nowhere' that you manage" in lines
    assert any(line.startswith("model globex/chat: routes[0].backend: no backend 'acme-gpu' visible") for line in lines)
    assert any(line.startswith("model globex/chat: routes[1].backend: no backend 'missing'") for line in lines)
    # A shared model may route only to shared backends: otherwise other tenants would reach acme's server.
    assert any(line.startswith("model shared/chat: routes[0].backend: no backend 'acme-gpu'") for line in lines)
    assert sql(migrated_env, "SELECT COUNT(*) FROM backends")[0][0] == 0
    assert sql(migrated_env, "SELECT COUNT(*) FROM models")[0][0] == 0

    code, out, err = apply(migrated_env, tmp_path, ACME_GPU + """
[[models]]
slug = "acme/chat"
modality = "chat"
tenant = "acme"
routes = [ { backend = "acme-gpu" } ]
""")
    assert code == 0, err
    assert routes(migrated_env, "acme/chat") == [("acme-gpu", 1, 1)]


def test_a_tenants_backend_on_a_private_address_needs_the_operators_consent(migrated_env: dict[str, str],
                                                                           tmp_path: Path) -> None:
    add_tenant(migrated_env, "acme")
    strict = {**migrated_env, "BACKEND_ALLOW_PRIVATE_TARGETS": "false"}
    code, out, err = apply(strict, tmp_path, CATALOGUE + ACME_GPU)
    assert code == 1, out
    # The shared vllm-a on 127.0.0.1 is the platform's own and passes; acme's backend there does not.
    assert [line for line in err.splitlines() if "base_url" in line] == [
        "backend acme-gpu: base_url: 127.0.0.1 is a loopback address; a tenant's backend must be on a public address "
        "(the operator may allow private ones with BACKEND_ALLOW_PRIVATE_TARGETS=true, or make it a shared backend)"]
    assert sql(migrated_env, "SELECT COUNT(*) FROM backends")[0][0] == 0


def test_bad_files_are_refused_with_one_line(migrated_env: dict[str, str], tmp_path: Path) -> None:
    code, _, err = apply(migrated_env, tmp_path, "[[backends]\nid=")
    assert code == 1 and "not valid TOML" in err and "Traceback" not in err
    code, _, err = apply(migrated_env, tmp_path, '[[backend]]\nid = "x"\n[backends]\nid = "y"\n')
    assert code == 1
    assert "unknown table 'backend' (expected [[backends]] and [[models]])" in err
    assert "backends: write each item as a [[backends]] table" in err
    code, _, err = apply(migrated_env, tmp_path, CATALOGUE + CATALOGUE.split("[[models]]")[0])
    assert code == 1
    assert "backend vllm-a: id: defined twice in the file" in err


def test_a_change_is_announced_to_running_processes(migrated_env: dict[str, str], tmp_path: Path) -> None:
    with sync_redis.Redis.from_url(migrated_env["REDIS_URL"]) as client, client.pubsub() as pubsub:
        pubsub.subscribe(CHANNEL)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        assert apply(migrated_env, tmp_path, CATALOGUE)[0] == 0
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["data"] == b"catalogue:"
        assert apply(migrated_env, tmp_path, CATALOGUE)[0] == 0
        assert pubsub.get_message(timeout=0.5) is None  # nothing changed, nothing to reload

    without_redis = {k: v for k, v in migrated_env.items() if k != "REDIS_URL"}
    code, _, err = apply(without_redis, tmp_path, CATALOGUE.replace('"0.10"', '"0.11"'))
    assert code == 0
    assert "REDIS_URL is not set" in err and "next start" in err


def test_the_documented_example_applies(migrated_env: dict[str, str]) -> None:
    result = scaigrid("admin", "apply", str(REPO / "docs" / "catalogue.example.toml"), env=migrated_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "backend vllm-a: created", "backend openai-b: created", "backend node-eu-01-llama: created",
        "model scailabs/poolnoodle-omni: created"]


def test_the_documented_names_apply_and_the_former_ones_are_the_same_item(migrated_env: dict[str, str],
                                                                           tmp_path: Path) -> None:
    documented = CATALOGUE.replace("price_input_per_mtok", "input_price_per_mtok").replace(
        "price_output_per_mtok", "output_price_per_mtok").replace(
        'display_name = "Poolnoodle Omni"',
        'display_name = "Poolnoodle Omni"\ndescription = """Multilingual chat.\n"""')
    code, out, err = apply(migrated_env, tmp_path, documented)
    assert code == 0, err
    assert sql(migrated_env, "SELECT price_input_per_mtok, price_output_per_mtok, description FROM models")[0] == (
        2.5, 10, "Multilingual chat.\n")
    # The same prices under the former names (with the description) change nothing.
    code, out, err = apply(migrated_env, tmp_path, CATALOGUE.replace(
        'display_name = "Poolnoodle Omni"', 'display_name = "Poolnoodle Omni"\ndescription = "Multilingual chat.\\n"'))
    assert code == 0 and out.splitlines()[-1] == "model scailabs/poolnoodle-omni: unchanged", (out, err)
    # Both names with two prices: refused, naming the item and the field; nothing written.
    code, out, err = apply(migrated_env, tmp_path, documented.replace(
        'output_price_per_mtok = "10.00"', 'output_price_per_mtok = "10.00"\nprice_output_per_mtok = "12"'))
    assert code == 1 and err.splitlines()[0].startswith(
        "model scailabs/poolnoodle-omni: price_output_per_mtok: the former name of output_price_per_mtok"), err
    assert sql(migrated_env, "SELECT price_output_per_mtok FROM models")[0][0] == 10
