"""A node's settings on the session's services, the operator's keys, and a running node as tests see it."""

import secrets
from dataclasses import dataclass

from cryptography.fernet import Fernet
from minio import Minio

from appliance import devstack
from tests.support.processes import ModeProcess, scaigrid

PORT_SETTINGS = ("HTTP_PORT", "GRPC_PORT", "BUNKER_PROXY_PORT", "GRPC_METRICS_PORT", "WORKER_METRICS_PORT",
                 "LINK_METRICS_PORT")


def node_env(database_url: str, redis_url: str, s3_server: devstack.S3Server, s3_bucket: str) -> dict[str, str]:
    """Complete settings for a node on that database, Redis and bucket, with free ports (for any fixture scope)."""
    return {
        "APP_ENV": "test",
        "APP_LOG_LEVEL": "debug",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "S3_ENDPOINT_URL": s3_server.endpoint_url,
        "S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        "S3_BUCKET": s3_bucket,
        **dict(zip(PORT_SETTINGS, map(str, devstack.free_ports(len(PORT_SETTINGS))), strict=True)),
        "JWT_SIGNING_SECRET": secrets.token_hex(32),
        "SCAIGRID_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "SERVICE_TOKEN_SECRET": secrets.token_hex(32),
    }


def s3_client(server: devstack.S3Server) -> Minio:
    return Minio(f"127.0.0.1:{server.port}", access_key=server.access_key_id,
                 secret_key=server.secret_access_key, secure=False)


def create_key(env: dict[str, str], role: str, tenant: str = "default") -> str:
    """An API key made the way an operator makes one: `scaigrid admin create-key`."""
    result = scaigrid("admin", "create-key", "--role", role, "--tenant", tenant, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@dataclass
class Node:
    """One http process of a migrated node, and a super_admin key for it."""

    env: dict[str, str]
    process: ModeProcess
    admin_key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['HTTP_PORT']}"

    def key(self, role: str, tenant: str = "default") -> str:
        return create_key(self.env, role, tenant)
