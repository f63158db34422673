"""The config snapshot's schema alone, without a database: a well-formed body parses, and a bad one is refused with a
reason that names the section, row and field at fault."""

import copy
from collections.abc import Callable
from typing import Any

import pytest

from scaigrid.hybrid.snapshot_schema import SCHEMA, SECTIONS, SnapshotRejected, canonical, digest, parse


def valid_body() -> dict[str, Any]:
    """One of each row, every field as the managed side's `current` writes it."""
    return {
        "schema": SCHEMA,
        "partners": [{"id": "ptn_1", "slug": "acme", "name": "Acme", "status": "active", "rpm_limit": None}],
        "tenants": [{"id": "tnt_1", "partner_id": "ptn_1", "slug": "acme-eu", "name": "Acme EU", "status": "active",
                     "rpm_limit": 600}],
        "users": [{"id": "usr_1", "tenant_id": "tnt_1", "email": "ops@acme.example", "display_name": None,
                   "role": "tenant_admin", "status": "active", "rpm_limit": None}],
        "api_keys": [{"id": "key_1", "tenant_id": "tnt_1", "user_id": "usr_1", "name": "ci", "key_hash": "ab" * 32,
                      "key_prefix": "sg_live_ab", "role": "tenant_user", "rpm_limit": None,
                      "expires_at": "2030-01-31T12:00:00+00:00", "revoked_at": None}],
        "managed_models": [{"slug": "acme/chat", "tenant_id": None, "display_name": "Chat", "modality": "chat",
                            "context_window": 8192, "max_output_tokens": 1024, "status": "active",
                            "price_input_per_mtok": "0.5", "price_output_per_mtok": "1.25"}],
    }


def refusal(edit: Callable[[dict[str, Any]], None]) -> str:
    """The reason `parse` refuses the valid body with `edit` made to it (correctly hashed, so the digest passes)."""
    body = copy.deepcopy(valid_body())
    edit(body)
    body_json = canonical(body)
    with pytest.raises(SnapshotRejected) as refused:
        parse(body_json, digest(body_json))
    return refused.value.reason


def test_a_valid_snapshot_parses_into_its_sections():
    body = valid_body()
    body_json = canonical(body)
    assert parse(body_json, digest(body_json)) == {section: body[section] for section in SECTIONS}


def test_a_slug_with_a_line_break_is_refused_naming_the_field():
    def slug(body: dict[str, Any]) -> None:
        body["tenants"][0]["slug"] = "acme\n"

    assert refusal(slug) == "tenants[0].slug: control characters (line breaks included) are not allowed"


def test_a_value_of_the_wrong_type_is_refused_naming_the_field():
    def rpm_as_text(body: dict[str, Any]) -> None:
        body["partners"][0]["rpm_limit"] = "600"

    def price_as_float(body: dict[str, Any]) -> None:
        body["managed_models"][0]["price_input_per_mtok"] = 0.5

    assert refusal(rpm_as_text) == "partners[0].rpm_limit: a whole number 1-2147483647"
    assert refusal(price_as_float).startswith("managed_models[0].price_input_per_mtok: a decimal string")


def test_a_missing_field_is_refused_naming_it():
    def null_email(body: dict[str, Any]) -> None:
        body["users"][0]["email"] = None

    def no_email(body: dict[str, Any]) -> None:
        del body["users"][0]["email"]

    def no_users(body: dict[str, Any]) -> None:
        del body["users"]

    assert refusal(null_email) == "users[0].email: required"
    # A row must have exactly its section's fields: the reason lists them, the missing one included.
    assert refusal(no_email) == ("users[0]: expected an object with exactly the fields "
                                 "id, tenant_id, email, display_name, role, status, rpm_limit")
    assert refusal(no_users) == "sections: unknown [], missing ['users']"


def test_a_damaged_body_or_a_dangling_reference_is_refused():
    body_json = canonical(valid_body())
    with pytest.raises(SnapshotRejected) as damaged:
        parse(body_json, "0" * 64)
    assert damaged.value.reason == "the body does not match its sha256 (damaged on its way?)"

    def dangling(body: dict[str, Any]) -> None:
        body["api_keys"][0]["user_id"] = "usr_gone"

    assert refusal(dangling) == "api_keys[0].user_id: 'usr_gone' is not in the snapshot"
