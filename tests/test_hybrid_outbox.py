"""The usage outbox: a node's usage flush queues records of the managed side's tenants for the link in the
transaction that stores them (except what the managed side served), batches are stable until acknowledged, and the
managed side stores a batch once, and only for the tenants allowed on the node that sent it."""

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError

from appliance import devstack
from scaigrid.accounting import flush, usage
from scaigrid.accounting.records import UsageRecord
from scaigrid.accounting.service import Accounting
from scaigrid.auth.tenancy import create_partner, create_tenant, create_user
from scaigrid.cache import InvalidationBus
from scaigrid.db.tables import backends, hybrid_mirrored, hybrid_usage_outbox, usage_records
from scaigrid.hybrid import enrollment, outbox, snapshot
from scaigrid.settings import load_settings
from scaigrid.worker.jobs import JobContext
from tests.accounting_fixtures import Ledger, ledger_for
from tests.accounting_fixtures import usage as usage_of

OWNER = {"partner_id": "prt_a", "tenant_id": "ten_a", "user_id": "usr_a"}  # a managed tenant the node mirrors
LOCAL = {"partner_id": "prt_local", "tenant_id": "ten_local", "user_id": "usr_local"}  # one the node made itself


@pytest.fixture
async def node_ledger(migrated_env: dict[str, str]) -> AsyncIterator[tuple[Ledger, JobContext]]:
    """An http process's accounting and the worker's flush job context, on a node (HYBRID_ROLE=node) whose config
    snapshot mirrored OWNER's tenant."""
    env = {**migrated_env, "HYBRID_ROLE": "node"}
    async with ledger_for(env) as ledger:
        async with ledger.engine.begin() as conn:
            await conn.execute(insert(hybrid_mirrored).values(kind=outbox.MIRRORED_TENANT, row_id=OWNER["tenant_id"]))
        yield ledger, JobContext(load_settings(env, env_file=None), ledger.engine, ledger.redis, "w1", 0)


async def _queued(ledger: Ledger) -> list[str]:
    async with ledger.engine.connect() as conn:
        return list((await conn.scalars(select(hybrid_usage_outbox.c.request_id)
                                        .order_by(hybrid_usage_outbox.c.seq))).all())


async def test_a_node_flush_queues_its_usage_for_the_link_with_the_insert_and_once(
        node_ledger: tuple[Ledger, JobContext]):
    ledger, ctx = node_ledger
    local = [usage_of(OWNER), usage_of(OWNER)]
    upstream = usage_of(OWNER, backend_id="managed-0123456789ab")  # the managed side accounted it already
    own_tenant = usage_of(LOCAL)  # the node's own tenant: unknown to the managed side, never leaves the appliance
    for record in [*local, upstream, own_tenant]:
        await ledger.accounting.record(record)

    # With the outbox table unavailable the flush fails as a whole: nothing is stored that is not also queued.
    async with ledger.engine.begin() as conn:
        await conn.execute(text("RENAME TABLE hybrid_usage_outbox TO hybrid_usage_outbox_away"))
    with pytest.raises(DBAPIError, match="hybrid_usage_outbox"):
        await flush.flush_usage(ctx)
    assert await ledger.stored() == (0, 0, 0)
    async with ledger.engine.begin() as conn:
        await conn.execute(text("RENAME TABLE hybrid_usage_outbox_away TO hybrid_usage_outbox"))

    await flush.flush_usage(ctx)  # the records stayed in the buffer: this flush takes them
    assert await ledger.has_rows(4)
    assert await _queued(ledger) == [record.request_id for record in local]
    for record in local:  # buffered again, as after a flush that died after its commit, before trimming
        await ledger.accounting.record(record)
    await flush.flush_usage(ctx)
    assert await ledger.has_rows(4) and await _queued(ledger) == [record.request_id for record in local]
    assert await outbox.depth(ledger.engine) == 2

    # With Redis down, an http process writes usage to MariaDB itself (no flush sees it): queued all the same, except
    # the node's own tenant's.
    dead_redis = Redis.from_url(f"redis://127.0.0.1:{devstack.free_ports(1)[0]}")
    direct, direct_own = usage_of(OWNER), usage_of(LOCAL)
    accounting = Accounting(ctx.settings, ledger.engine, dead_redis, InvalidationBus())
    await accounting.record(direct)
    await accounting.record(direct_own)
    await dead_redis.aclose()
    assert await ledger.has_rows(6)
    assert await _queued(ledger) == [*(record.request_id for record in local), direct.request_id]


async def test_usage_of_a_managed_backend_made_by_hand_is_not_queued(node_ledger: tuple[Ledger, JobContext]):
    """The managed side served it and accounted it under its own request id: sent too, it would count twice."""
    ledger, _ = node_ledger
    async with ledger.engine.begin() as conn:
        await conn.execute(insert(backends).values(id="cloud-fallback", provider="managed", base_url="",
                                                   model="cloud/chat", status="active"))
    local, upstream = usage_of(OWNER, backend_id="vllm-local"), usage_of(OWNER, backend_id="cloud-fallback")
    async with ledger.engine.begin() as conn:
        assert await outbox.enqueue(conn, [local, upstream, usage_of(OWNER, backend_id=None)]) == 2
    assert local.request_id in await _queued(ledger) and upstream.request_id not in await _queued(ledger)


def test_the_buffered_form_of_a_usage_record_is_the_previous_releases_unless_tunnelled():
    """During a rolling upgrade a worker of the release before decodes what new http processes buffer."""
    record = usage_of(OWNER)
    assert "tunnelled" not in json.loads(usage.encode(record)) and usage.decode(usage.encode(record)) == record
    tunnelled = replace(record, tunnelled=True)
    assert usage.decode(usage.encode(tunnelled)) == tunnelled


async def test_batches_are_stable_until_acknowledged_and_acknowledging_deletes_only_them(
        node_ledger: tuple[Ledger, JobContext]):
    ledger, _ = node_ledger
    records = [usage_of(OWNER) for _ in range(3)]
    async with ledger.engine.begin() as conn:
        assert await outbox.enqueue(conn, records) == 3
    assert await outbox.next_batch(ledger.engine, limit=5) is not None
    first = await outbox.next_batch(ledger.engine, limit=2)
    assert first is not None and first == await outbox.next_batch(ledger.engine, limit=2)  # sent again: same id
    assert [usage.decode(raw) for raw in first.records_json] == records[:2]
    assert first.batch_id == f"{first.seqs[0]}-{first.seqs[0] + 1}"

    later = usage_of(OWNER)
    async with ledger.engine.begin() as conn:
        await outbox.enqueue(conn, [later])
    await outbox.acknowledge(ledger.engine, first)
    assert await _queued(ledger) == [records[2].request_id, later.request_id]
    rest = await outbox.next_batch(ledger.engine)
    assert rest is not None and len(rest.records_json) == 2
    await outbox.acknowledge(ledger.engine, rest)
    assert await outbox.depth(ledger.engine) == 0 and await outbox.next_batch(ledger.engine) is None


async def test_a_record_committed_late_inside_a_batchs_range_survives_its_acknowledgement(
        node_ledger: tuple[Ledger, JobContext]):
    """The flush and an http process (Redis away) enqueue concurrently: seqs are taken at insert, committed in any
    order, so a batch read between the two commits skips a lower seq that is committed afterwards."""
    ledger, _ = node_ledger
    first, late, last = usage_of(OWNER), usage_of(OWNER), usage_of(OWNER)
    async with ledger.engine.begin() as conn:
        await outbox.enqueue(conn, [first])
    async with ledger.engine.connect() as slow:
        transaction = await slow.begin()
        await outbox.enqueue(slow, [late])  # takes the seq between the two, commits after the batch was read
        async with ledger.engine.begin() as conn:
            await outbox.enqueue(conn, [last])
        batch = await outbox.next_batch(ledger.engine)
        assert batch is not None and [usage.decode(raw) for raw in batch.records_json] == [first, last]
        await transaction.commit()
    await outbox.acknowledge(ledger.engine, batch)
    assert await _queued(ledger) == [late.request_id]  # still to be sent, not deleted unsent


async def _member(conn: Any, partner_id: str, slug: str) -> dict[str, str]:
    """A new tenant of the partner, with a user: the owner of usage records a node may report."""
    tenant_id = await create_tenant(conn, partner_id=partner_id, slug=slug, name=slug)
    user_id = await create_user(conn, tenant_id=tenant_id, email=f"someone@{slug}.example", role="tenant_user")
    return {"partner_id": partner_id, "tenant_id": tenant_id, "user_id": user_id}


async def _enrolled(conn: Any, name: str, tenant_ids: list[str]) -> str:
    """A node enrolled on the managed side, with these tenants allowed on it."""
    minted = await enrollment.mint_token(conn, name, 60)
    node_id, _ = await enrollment.enroll(conn, minted["token"], name, "1.0.0")
    await snapshot.set_allowed_tenants(conn, node_id, tenant_ids)
    return node_id


async def test_the_managed_side_stores_a_batch_once_and_skips_what_is_not_a_usage_record(
        migrated_env: dict[str, str], caplog: pytest.LogCaptureFixture):
    async with ledger_for(migrated_env) as ledger:
        async with ledger.engine.begin() as conn:
            partner_id = await create_partner(conn, slug="acme", name="Acme")
            owner = await _member(conn, partner_id, "acme-eu")
            node_id = await _enrolled(conn, "site-a", [owner["tenant_id"]])
        secret_model = "acme/model-" + "x" * 200  # too long for the column: this record cannot be stored
        good: list[UsageRecord] = [usage_of(owner), usage_of(owner, cost="0.000000000001")]
        bad = replace(usage_of(owner), model=secret_model)
        batch = [usage.encode(good[0]), "{not json", json.dumps({"request_id": "req_half"}), usage.encode(bad),
                 usage.encode(good[1])]
        with caplog.at_level(logging.ERROR, logger="scaigrid.hybrid.outbox"):
            assert await outbox.ingest(ledger.engine, node_id, batch) == 2
        # The same batch again, after a lost acknowledgement.
        assert await outbox.ingest(ledger.engine, node_id, batch) == 0
        async with ledger.engine.connect() as conn:
            stored = (await conn.execute(select(usage_records.c.request_id, usage_records.c.cost))).all()
            assert await conn.scalar(select(func.count()).select_from(usage_records)) == 2
    # At the managed side's price: none, as no managed model routes to the node's model; never the node's cost.
    assert {(row.request_id, row.cost) for row in stored} == {(r.request_id, 0) for r in good}
    skipped = [message for message in caplog.messages if "skipped" in message]
    assert len(skipped) == 6  # three bad records, in each of the two deliveries
    assert any(bad.request_id in message and "model is not a string" in message for message in skipped)
    assert any("req_half" in message for message in skipped)
    assert not any(secret_model in message for message in caplog.messages)


async def test_a_node_accounts_only_for_the_tenants_allowed_on_it(migrated_env: dict[str, str],
                                                                  caplog: pytest.LogCaptureFixture):
    """A node (its credential stolen, say) must not bill usage to another node's tenants, nor to its own tenant
    under another partner; usage of the node's own local tenants is not the managed side's either."""
    async with ledger_for(migrated_env) as ledger:
        async with ledger.engine.begin() as conn:
            partner_id = await create_partner(conn, slug="acme", name="Acme")
            rival_partner = await create_partner(conn, slug="rival", name="Rival")
            ours = await _member(conn, partner_id, "acme-eu")
            theirs = await _member(conn, partner_id, "acme-us")
            node_id = await _enrolled(conn, "site-a", [ours["tenant_id"]])
            other_node = await _enrolled(conn, "site-b", [theirs["tenant_id"]])
        mine = usage_of(ours)
        foreign = [usage_of(theirs, model="acme/secret-model"), usage_of({**ours, "partner_id": rival_partner}),
                   usage_of(LOCAL)]
        with caplog.at_level(logging.WARNING, logger="scaigrid.hybrid.outbox"):
            assert await outbox.ingest(ledger.engine, node_id, [usage.encode(r) for r in [mine, *foreign]]) == 1
            # The other node's tenant, from the other node: its own, stored.
            assert await outbox.ingest(ledger.engine, other_node, [usage.encode(foreign[0])]) == 1
        async with ledger.engine.connect() as conn:
            stored = (await conn.execute(select(usage_records.c.request_id, usage_records.c.tenant_id,
                                                usage_records.c.partner_id))).all()
    assert sorted(map(tuple, stored)) == sorted([(mine.request_id, ours["tenant_id"], partner_id),
                                                 (foreign[0].request_id, theirs["tenant_id"], partner_id)])
    assert f"3 usage record(s) of node {node_id} not stored: their tenants are not allowed on the node" \
        in caplog.messages
    assert not any(record.request_id in message or "secret-model" in message
                   for record in foreign for message in caplog.messages)  # counted, never described
