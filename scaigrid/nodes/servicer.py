"""The grpc mode's HeartbeatService of scaiinfer.v1 (nodes call it; the gateway calls the nodes' InferenceService)."""

import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid import errors
from scaigrid.auth.service_tokens import SCAIINFER_NODE
from scaigrid.nodes import registry
from scaigrid.rpc.generated.scaiinfer.v1 import scaiinfer_pb2, scaiinfer_pb2_grpc
from scaigrid.rpc.interceptors import CALLER, accepts
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)


class HeartbeatServicer(scaiinfer_pb2_grpc.HeartbeatServiceServicer):
    def __init__(self, engine: AsyncEngine, settings: Settings) -> None:
        self._engine = engine
        self._interval_s = settings.nodes.heartbeat_interval_s
        # Set whenever a call gets here: the interceptor accepts no service token without it.
        self._secret = settings.auth.service_token_secret

    @accepts(SCAIINFER_NODE)
    async def Heartbeat(self, request: scaiinfer_pb2.HeartbeatRequest, context: Any) -> scaiinfer_pb2.HeartbeatResponse:
        beat = registry.parse_heartbeat(request.node_id, request.endpoint, list(request.models), request.capacity,
                                     request.load, request.version)
        # A node speaks for itself only: otherwise any token could announce another node's endpoint and take its
        # traffic.
        expected = registry.token_name(beat.node_id)
        if CALLER.get().name != expected:
            raise errors.not_permitted(f"node {beat.node_id!r} heartbeats with a service token named {expected!r}")
        await registry.record_heartbeat(self._engine, beat)
        logger.debug("heartbeat from node %s", beat.node_id, extra={"event": "node_heartbeat", "node_id": beat.node_id})
        assert self._secret is not None
        return scaiinfer_pb2.HeartbeatResponse(heartbeat_interval_s=self._interval_s,
                                               gateway_token=registry.call_token(self._secret, beat.node_id))
