"""Config snapshots: the managed side computes what a node may know (only its tenants, versioned by content), and a
node mirrors it into its own database, where a real http process then authenticates managed keys and offers managed
models; a bad snapshot is refused with its reason and changes nothing."""

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from appliance import devstack
from scaigrid.auth.keys import create_api_key
from scaigrid.auth.tenancy import create_partner, create_tenant, create_user
from scaigrid.db.tables import (
    api_keys,
    backends,
    hybrid_node_snapshots,
    model_routes,
    models,
    new_id,
    partners,
    tenants,
    users,
)
from scaigrid.errors import ScaigridError
from scaigrid.hybrid import enrollment, mirror, outbox, snapshot, snapshot_schema
from tests.accounting_fixtures import usage as usage_of
from tests.backends import http_call, models_listed
from tests.identity import call
from tests.support.env import PORT_SETTINGS, create_key
from tests.support.processes import ModeProcess, scaigrid, start_http
from tests.support.waiting import eventually, eventually_async


@dataclass
class Managed:
    """A managed side's database: one partner with two tenants, of which only `allowed` is on the node."""

    engine: AsyncEngine
    node_id: str
    partner_id: str
    allowed: str
    other: str
    user_id: str
    admin_user_id: str  # a super_admin in the allowed tenant: platform roles stay on the managed side
    key_id: str
    key: str
    second_key: str
    other_key: str


async def _model(conn: Any, slug: str, backend_id: str, provider: str, backend_model: str,
                 tenant_id: str | None = None) -> None:
    await conn.execute(insert(backends).values(id=backend_id, provider=provider, base_url="http://127.0.0.1:9/v1",
                                               model=backend_model))
    model_id = new_id("mdl")
    await conn.execute(insert(models).values(id=model_id, slug=slug, tenant_id=tenant_id, display_name=slug,
                                             modality="chat", context_window=8192, price_input_per_mtok="0.5",
                                             price_output_per_mtok="1.25"))
    await conn.execute(insert(model_routes).values(model_id=model_id, backend_id=backend_id))


@pytest.fixture
async def managed(migrated_env: dict[str, str]) -> AsyncIterator[Managed]:
    engine = create_async_engine(migrated_env["DATABASE_URL"])
    async with engine.begin() as conn:
        partner_id = await create_partner(conn, slug="acme", name="Acme")
        allowed = await create_tenant(conn, partner_id=partner_id, slug="acme-eu", name="Acme EU")
        other = await create_tenant(conn, partner_id=partner_id, slug="acme-us", name="Acme US")
        user_id = await create_user(conn, tenant_id=allowed, email="ana@acme.example", role="tenant_user")
        admin_user_id = await create_user(conn, tenant_id=allowed, email="root@acme.example", role="super_admin")
        other_user = await create_user(conn, tenant_id=other, email="bo@acme.example", role="tenant_admin")
        key_id, key = await create_api_key(conn, tenant_id=allowed, user_id=user_id, name="ana", role="tenant_user")
        _, second_key = await create_api_key(conn, tenant_id=allowed, user_id=user_id, name="ana-2",
                                             role="tenant_viewer")
        await create_api_key(conn, tenant_id=allowed, user_id=admin_user_id, name="root", role="super_admin")
        _, other_key = await create_api_key(conn, tenant_id=other, user_id=other_user, name="bo", role="tenant_admin")
        minted = await enrollment.mint_token(conn, "site-a", 60)
        node_id, _ = await enrollment.enroll(conn, minted["token"], "site-a", "1.0.0")
        await _model(conn, "acme/chat", "cloud-gpu", "openai", "chat-large")
        await _model(conn, "acme/us-only", "cloud-us", "openai", "chat-us", tenant_id=other)
        # Served by this very node through the tunnel: offering it back to the node would be a loop.
        await _model(conn, "site-a/llama", "site-a-llama", "openai", f"{node_id}/llama")
        await conn.execute(update(backends).where(backends.c.id == "site-a-llama").values(provider="hybrid"))
        await snapshot.set_allowed_tenants(conn, node_id, [allowed])
    yield Managed(engine, node_id, partner_id, allowed, other, user_id, admin_user_id, key_id, key, second_key,
                  other_key)
    await engine.dispose()


@dataclass
class NodeSide:
    env: dict[str, str]
    engine: AsyncEngine
    redis: Redis


@pytest.fixture
async def node_side(migrated_env: dict[str, str], mariadb: devstack.MariaDB) -> AsyncIterator[NodeSide]:
    """An appliance's own database (a second one on the session MariaDB), migrated, on the same Redis."""
    name = "n_" + secrets.token_hex(6)
    env = {**migrated_env, "DATABASE_URL": mariadb.create_database(name, name, secrets.token_hex(12)),
           "HYBRID_ROLE": "node",
           **dict(zip(PORT_SETTINGS, map(str, devstack.free_ports(len(PORT_SETTINGS))), strict=True))}
    migrated = scaigrid("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    engine = create_async_engine(env["DATABASE_URL"])
    redis = Redis.from_url(env["REDIS_URL"])
    yield NodeSide(env, engine, redis)
    await redis.aclose()
    await engine.dispose()
    mariadb.drop_database(name)


async def _apply(node: NodeSide, node_id: str, snap: snapshot.Snapshot) -> None:
    await mirror.apply(node.engine, node_id, snap.version, snap.body_json, snap.sha256, redis=node.redis)


async def _lock_waited(root: AsyncEngine) -> bool:
    async with root.connect() as conn:
        return bool(await conn.scalar(text("SELECT COUNT(*) FROM information_schema.INNODB_LOCK_WAITS")))


async def test_a_snapshot_holds_only_the_nodes_tenants_and_its_version_moves_only_with_its_content(
        managed: Managed, mariadb: devstack.MariaDB):
    first = await snapshot.current(managed.engine, managed.node_id)
    body = json.loads(first.body_json)
    assert first.body_json == json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert first.sha256 == hashlib.sha256(first.body_json.encode()).hexdigest() and first.version == 1
    assert body["schema"] == 1
    assert [t["id"] for t in body["tenants"]] == [managed.allowed]
    assert [p["id"] for p in body["partners"]] == [managed.partner_id]
    assert [u["id"] for u in body["users"]] == [managed.user_id]
    assert {k["key_hash"] for k in body["api_keys"]} == {
        hashlib.sha256(key.encode()).hexdigest() for key in (managed.key, managed.second_key)}
    assert [m["slug"] for m in body["managed_models"]] == ["acme/chat"]
    assert body["managed_models"][0]["price_output_per_mtok"] == "1.25"
    assert managed.other not in first.body_json and managed.admin_user_id not in first.body_json
    assert not any(key in first.body_json for key in (managed.key, managed.second_key, managed.other_key))

    again = await snapshot.current(managed.engine, managed.node_id)
    assert (again.version, again.sha256) == (1, first.sha256)

    async with managed.engine.begin() as conn:  # a change elsewhere is no change for this node
        await conn.execute(update(tenants).where(tenants.c.id == managed.other).values(name="Acme Americas"))
    assert (await snapshot.current(managed.engine, managed.node_id)).version == 1

    async with managed.engine.begin() as conn:
        await conn.execute(update(tenants).where(tenants.c.id == managed.allowed).values(name="Acme Europe"))
    # Replicas computing at once agree on one version for one body.
    racing = await asyncio.gather(*(snapshot.current(managed.engine, managed.node_id) for _ in range(4)))
    assert {(snap.version, snap.body_json) for snap in racing} == {(2, racing[0].body_json)}
    assert json.loads(racing[0].body_json)["tenants"][0]["name"] == "Acme Europe"

    # A replica that waited for another's lock reads what was committed meanwhile, not what was there before.
    root = create_async_engine(mariadb.admin_url())
    async with managed.engine.connect() as holder, holder.begin():
        await holder.execute(select(hybrid_node_snapshots).where(
            hybrid_node_snapshots.c.node_id == managed.node_id).with_for_update())
        waiting = asyncio.create_task(snapshot.current(managed.engine, managed.node_id))
        await eventually_async(lambda: _lock_waited(root), "current() waiting for the lock")
        async with managed.engine.begin() as conn:
            await conn.execute(update(tenants).where(tenants.c.id == managed.allowed).values(name="Acme Europa"))
    await root.dispose()
    late = await waiting
    assert late.version == 3 and json.loads(late.body_json)["tenants"][0]["name"] == "Acme Europa"

    with pytest.raises(ScaigridError) as unknown:
        await snapshot.current(managed.engine, "hn_nope")
    assert unknown.value.code == "NOT_FOUND"


async def test_super_admins_choose_a_nodes_tenants_over_the_api(
        migrated_env: dict[str, str], managed: Managed, start_mode: Callable[..., ModeProcess]):
    env = {**migrated_env, "HYBRID_ROLE": "managed"}
    start_http(start_mode, env)
    url, admin = f"http://127.0.0.1:{env['HTTP_PORT']}", create_key(env, "super_admin")
    path = f"/v1/hybrid/nodes/{managed.node_id}/tenants"

    assert call(url, "GET", path, admin).data == {"node_id": managed.node_id, "tenant_ids": [managed.allowed]}
    both = sorted([managed.allowed, managed.other])
    assert call(url, "PUT", path, admin, {"tenant_ids": both}).data["tenant_ids"] == both
    refused = call(url, "PUT", path, admin, {"tenant_ids": [managed.other, "ten_nope"]})
    assert (refused.status, refused.code) == (422, "VALIDATION_ERROR")
    assert refused.body["error"]["details"] == [{"field": "tenant_ids", "message": "no tenant 'ten_nope'"}]
    assert call(url, "GET", path, admin).data["tenant_ids"] == both  # the refused change changed nothing
    assert call(url, "PUT", path, admin, {"tenant_ids": []}).data["tenant_ids"] == []
    missing = call(url, "PUT", "/v1/hybrid/nodes/hn_nope/tenants", admin, {"tenant_ids": []})
    assert (missing.status, missing.code) == (404, "NOT_FOUND")
    assert call(url, "GET", "/v1/hybrid/nodes/hn_nope/tenants", admin).status == 404
    assert call(url, "PUT", path, create_key(env, "tenant_admin"), {"tenant_ids": []}).status == 403


@pytest.mark.timeout(180)  # two databases migrated, an http process, and keys refused only after announcements
async def test_a_node_serves_managed_keys_from_its_snapshot_and_refuses_those_taken_away(
        managed: Managed, node_side: NodeSide, start_mode: Callable[..., ModeProcess]):
    async with managed.engine.begin() as conn:  # an admin of the tenant on the managed side: a mere user on the node
        tenant_admin = await create_user(conn, tenant_id=managed.allowed, email="ada@acme.example",
                                         role="tenant_admin")
        _, admin_key = await create_api_key(conn, tenant_id=managed.allowed, user_id=tenant_admin, name="ada",
                                            role="tenant_admin")
    await _apply(node_side, managed.node_id, await snapshot.current(managed.engine, managed.node_id))
    # Started after the apply, as after a restart with the managed side unreachable: it serves from its tables.
    start_http(start_mode, node_side.env)
    url = f"http://127.0.0.1:{node_side.env['HTTP_PORT']}"
    assert models_listed(url, managed.key) == {"acme/chat"}
    assert http_call("GET", url + "/oai/v1/models", managed.other_key)[0] == 401
    # No webhooks sent from inside the customer's network, no /health/detailed: the appliance has its own admin.
    assert models_listed(url, admin_key) == {"acme/chat"}
    assert call(url, "GET", "/v1/webhooks", admin_key).status == 403
    assert call(url, "GET", "/health/detailed", admin_key).status == 403
    async with node_side.engine.connect() as conn:
        roles = dict((await conn.execute(select(api_keys.c.id, api_keys.c.role))).tuples().all())
        assert await conn.scalar(select(users.c.role).where(users.c.id == tenant_admin)) == "tenant_user"
    assert roles[managed.key_id] == "tenant_user" and "tenant_viewer" in roles.values()  # a viewer stays one
    assert "tenant_admin" not in roles.values()
    async with node_side.engine.connect() as conn:
        [(provider, backend_id, backend_model)] = (await conn.execute(
            select(backends.c.provider, backends.c.id, backends.c.model)
            .select_from(model_routes.join(models).join(backends)).where(models.c.slug == "acme/chat"))).all()
    assert (provider, backend_model) == ("managed", "acme/chat") and backend_id.startswith("managed-")

    async with managed.engine.begin() as conn:
        await conn.execute(delete(api_keys).where(api_keys.c.id == managed.key_id))
    second = await snapshot.current(managed.engine, managed.node_id)
    await _apply(node_side, managed.node_id, second)
    # Slowly: every poll is a request counted against the key's rate limit.
    eventually(lambda: http_call("GET", url + "/oai/v1/models", managed.key)[0] == 401, "the removed key refused",
               interval_s=0.3)
    assert models_listed(url, managed.second_key) == {"acme/chat"}
    assert await mirror.applied(node_side.engine) == (2, second.sha256)

    async with managed.engine.begin() as conn:
        await snapshot.set_allowed_tenants(conn, managed.node_id, [])
    await _apply(node_side, managed.node_id, await snapshot.current(managed.engine, managed.node_id))
    eventually(lambda: http_call("GET", url + "/oai/v1/models", managed.second_key)[0] == 401,
               "the tenant switched off", interval_s=0.3)
    async with node_side.engine.connect() as conn:
        status = await conn.scalar(select(tenants.c.status).where(tenants.c.id == managed.allowed))
        offered = (await conn.scalars(select(models.c.slug))).all()
    assert status == "disabled" and "acme/chat" not in offered


async def _node_state(engine: AsyncEngine) -> dict[str, list[Any]]:
    async with engine.connect() as conn:
        return {table: sorted(map(tuple, (await conn.execute(text(f"SELECT * FROM {table}"))).all()), key=repr)
                for table in ("partners", "tenants", "users", "api_keys", "models", "backends", "model_routes",
                              "hybrid_mirrored", "hybrid_applied_snapshot")}


def _edited(snap: snapshot.Snapshot, edit: Callable[[dict[str, Any]], None]) -> tuple[int, str, str]:
    """The snapshot's next version with `edit` made to its body, correctly hashed."""
    body = json.loads(snap.body_json)
    edit(body)
    body_json = snapshot_schema.canonical(body)
    return snap.version + 1, body_json, snapshot_schema.digest(body_json)


async def test_a_bad_snapshot_is_refused_with_its_reason_and_the_node_keeps_what_it_had(
        managed: Managed, node_side: NodeSide, caplog: pytest.LogCaptureFixture):
    async with node_side.engine.begin() as conn:  # the node's own model of the slug a managed model has
        await conn.execute(insert(backends).values(id="local-gpu", provider="openai", base_url="http://10.0.0.5/v1",
                                                   model="chat"))
        model_id = new_id("mdl")
        await conn.execute(insert(models).values(id=model_id, slug="acme/chat", modality="chat"))
        await conn.execute(insert(model_routes).values(model_id=model_id, backend_id="local-gpu"))
        local_tenant = await conn.scalar(select(tenants.c.id).where(tenants.c.slug == "default"))
    first = await snapshot.current(managed.engine, managed.node_id)
    with caplog.at_level(logging.WARNING, logger="scaigrid.hybrid.mirror"):
        await _apply(node_side, managed.node_id, first)
    assert "managed model acme/chat is not offered here: a local model has that slug" in caplog.messages
    before = await _node_state(node_side.engine)
    assert [row[1] for row in before["model_routes"]] == ["local-gpu"]  # the local model kept its route

    def dangling(body: dict[str, Any]) -> None:
        body["api_keys"][0]["user_id"] = "usr_gone"

    def collides(body: dict[str, Any]) -> None:
        body["tenants"].append({**body["tenants"][0], "id": local_tenant, "slug": "taken-over"})

    def escalates(body: dict[str, Any]) -> None:
        body["api_keys"][0]["role"] = "super_admin"

    def misshapen(body: dict[str, Any]) -> None:
        body["users"] = {}

    cases = [
        ((2, first.body_json, "0" * 64), "the body does not match its sha256 (damaged on its way?)"),
        ((first.version, first.body_json, first.sha256), "version 1 is not newer than the applied version 1"),
        (_edited(first, dangling), "api_keys[0].user_id: 'usr_gone' is not in the snapshot"),
        (_edited(first, collides), f"tenants: {local_tenant!r} exists on this node and was not made by the link"),
        (_edited(first, escalates), "api_keys[0].role: one of: tenant_admin, tenant_user, tenant_viewer"),
        (_edited(first, misshapen), "users: expected a list"),
    ]
    for (version, body_json, sha256), reason in cases:
        with pytest.raises(snapshot_schema.SnapshotRejected) as refused:
            await mirror.apply(node_side.engine, managed.node_id, version, body_json, sha256,
                                 redis=node_side.redis)
        assert refused.value.reason == reason
        assert await _node_state(node_side.engine) == before, reason
    assert await mirror.applied(node_side.engine) == (1, first.sha256)


async def test_the_snapshot_takes_every_slug_the_api_takes_and_refuses_what_it_refuses(
        managed: Managed, migrated_env: dict[str, str], start_mode: Callable[..., ModeProcess]):
    """Exploit: the API took "acme\\n" (re.match) where the snapshot's check did not (fullmatch), so one tenant's slug
    made every node refuse its whole snapshot. Both now read with the one body reader."""
    start_http(start_mode, migrated_env)
    url, admin = f"http://127.0.0.1:{migrated_env['HTTP_PORT']}", create_key(migrated_env, "super_admin")
    edge = "0" + "a-" * 31 + "z"  # 64 characters: the longest slug
    made = call(url, "POST", "/v1/tenants", admin, {"slug": edge, "name": "Edge",
                                                         "partner_id": managed.partner_id})
    assert made.status == 201, made.body
    async with managed.engine.begin() as conn:
        await snapshot.set_allowed_tenants(conn, managed.node_id, [managed.allowed, made.data["id"]])
    taken = await snapshot.current(managed.engine, managed.node_id)
    assert edge in {row["slug"] for row in snapshot_schema.parse(taken.body_json, taken.sha256)["tenants"]}

    for slug in ("acme-eu\n", "acme-eu\r", "Acme", "-acme", "acme-", edge + "b", "ac me", "acme\u2028"):
        refused = call(url, "POST", "/v1/tenants", admin, {"slug": slug, "name": "X",
                                                               "partner_id": managed.partner_id})
        assert (refused.status, [d["field"] for d in refused.body["error"]["details"]]) == (422, ["slug"]), slug

        def slugged(body: dict[str, Any], slug: str = slug) -> None:
            body["tenants"][0]["slug"] = slug

        _, body_json, sha256 = _edited(taken, slugged)
        with pytest.raises(snapshot_schema.SnapshotRejected) as rejected:
            snapshot_schema.parse(body_json, sha256)
        assert rejected.value.reason.startswith("tenants[0].slug: "), (slug, rejected.value.reason)


async def test_forgetting_the_mirror_switches_it_off_and_a_new_enrolment_starts_its_versions_over(
        managed: Managed, node_side: NodeSide):
    first = await snapshot.current(managed.engine, managed.node_id)
    await _apply(node_side, managed.node_id, first)
    async with managed.engine.begin() as conn:
        await conn.execute(update(tenants).where(tenants.c.id == managed.allowed).values(name="Acme Europe"))
        minted = await enrollment.mint_token(conn, "site-a-again", 60)
        new_node_id, _ = await enrollment.enroll(conn, minted["token"], "site-a-again", "1.0.0")
        await snapshot.set_allowed_tenants(conn, new_node_id, [managed.allowed])
    await _apply(node_side, managed.node_id, await snapshot.current(managed.engine, managed.node_id))
    # Enrolled again, as a new node whose versions count from 1: taken, although 2 is applied.
    fresh = await snapshot.current(managed.engine, new_node_id)
    slugs = {model["slug"] for model in json.loads(fresh.body_json)["managed_models"]}
    assert fresh.version == 1 and "acme/chat" in slugs
    await _apply(node_side, new_node_id, fresh)
    assert await mirror.applied(node_side.engine) == (1, fresh.sha256)
    async with node_side.engine.begin() as conn:
        assert await outbox.enqueue(conn, [usage_of({"partner_id": managed.partner_id,
                                                     "tenant_id": managed.allowed})]) == 1
        local_tenant = await conn.scalar(select(tenants.c.id).where(tenants.c.slug == "default"))

    forgotten = await mirror.forget(node_side.engine, node_side.redis)

    assert forgotten == mirror.Forgotten(
        node_id=new_node_id, version=1, switched_off={"partner": 1, "tenant": 1, "user": 1, "api_key": 2},
        models_deleted=len(slugs), backends_disabled=len(slugs), outbox_left=1)
    assert await mirror.applied(node_side.engine) is None
    async with node_side.engine.connect() as conn:
        keys_on = (await conn.scalars(select(api_keys.c.id).where(api_keys.c.revoked_at.is_(None)))).all()
        statuses = {table.name: set((await conn.scalars(select(table.c.status))).all())
                    for table in (partners, tenants, users)}
        offered = (await conn.scalars(select(models.c.slug))).all()
        managed_backends = set((await conn.scalars(select(backends.c.status).where(
            backends.c.provider == "managed"))).all())
        local_status = await conn.scalar(select(tenants.c.status).where(tenants.c.id == local_tenant))
    assert managed.key_id not in keys_on and slugs.isdisjoint(offered) and managed_backends == {"disabled"}
    assert all("disabled" in found for found in statuses.values()) and local_status == "active"  # the node's own
    assert await outbox.depth(node_side.engine) == 1  # kept for a later enrolment
    again = await mirror.forget(node_side.engine, node_side.redis)
    assert (again.node_id, again.switched_off, again.models_deleted) == (None, dict.fromkeys(again.switched_off, 0), 0)

    await _apply(node_side, new_node_id, fresh)  # taken again: forget dropped the applied version
    async with node_side.engine.connect() as conn:
        revoked = await conn.scalar(select(api_keys.c.revoked_at).where(api_keys.c.id == managed.key_id))
        offered = (await conn.scalars(select(models.c.slug))).all()
    assert revoked is None and slugs <= set(offered)
