from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "config_applied", "usage", "tunnel")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_APPLIED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    config_applied: ConfigApplied
    usage: UsageBatch
    tunnel: TunnelFrame
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., config_applied: _Optional[_Union[ConfigApplied, _Mapping]] = ..., usage: _Optional[_Union[UsageBatch, _Mapping]] = ..., tunnel: _Optional[_Union[TunnelFrame, _Mapping]] = ...) -> None: ...

class ManagedMessage(_message.Message):
    __slots__ = ("welcome", "heartbeat_ack", "config", "usage_ack", "tunnel_request", "tunnel_cancel", "tunnel_credit")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    USAGE_ACK_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_CANCEL_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_CREDIT_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    heartbeat_ack: HeartbeatAck
    config: ConfigSnapshot
    usage_ack: UsageAck
    tunnel_request: TunnelRequest
    tunnel_cancel: TunnelCancel
    tunnel_credit: TunnelCredit
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., config: _Optional[_Union[ConfigSnapshot, _Mapping]] = ..., usage_ack: _Optional[_Union[UsageAck, _Mapping]] = ..., tunnel_request: _Optional[_Union[TunnelRequest, _Mapping]] = ..., tunnel_cancel: _Optional[_Union[TunnelCancel, _Mapping]] = ..., tunnel_credit: _Optional[_Union[TunnelCredit, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "software_version", "config_hash", "config_version", "health", "models")
    class HealthEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    software_version: str
    config_hash: str
    config_version: int
    health: _containers.ScalarMap[str, str]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol_version: _Optional[int] = ..., software_version: _Optional[str] = ..., config_hash: _Optional[str] = ..., config_version: _Optional[int] = ..., health: _Optional[_Mapping[str, str]] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("node_id", "software_version", "protocol_version", "heartbeat_interval_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    software_version: str
    protocol_version: int
    heartbeat_interval_s: int
    def __init__(self, node_id: _Optional[str] = ..., software_version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., heartbeat_interval_s: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq", "outbox_depth", "tunnels_in_flight", "config_version")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TUNNELS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    outbox_depth: int
    tunnels_in_flight: int
    config_version: int
    def __init__(self, seq: _Optional[int] = ..., outbox_depth: _Optional[int] = ..., tunnels_in_flight: _Optional[int] = ..., config_version: _Optional[int] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class ConfigSnapshot(_message.Message):
    __slots__ = ("version", "body_json", "sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BODY_JSON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    version: int
    body_json: str
    sha256: str
    def __init__(self, version: _Optional[int] = ..., body_json: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class ConfigApplied(_message.Message):
    __slots__ = ("version", "ok", "error")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    version: int
    ok: bool
    error: str
    def __init__(self, version: _Optional[int] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class UsageBatch(_message.Message):
    __slots__ = ("batch_id", "records_json")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_JSON_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    records_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, batch_id: _Optional[str] = ..., records_json: _Optional[_Iterable[str]] = ...) -> None: ...

class UsageAck(_message.Message):
    __slots__ = ("batch_id", "stored")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    stored: int
    def __init__(self, batch_id: _Optional[str] = ..., stored: _Optional[int] = ...) -> None: ...

class TunnelRequest(_message.Message):
    __slots__ = ("tunnel_id", "node_id", "method", "path", "headers", "body", "credit", "caller", "assertion")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TUNNEL_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    ASSERTION_FIELD_NUMBER: _ClassVar[int]
    tunnel_id: str
    node_id: str
    method: str
    path: str
    headers: _containers.ScalarMap[str, str]
    body: bytes
    credit: int
    caller: Caller
    assertion: str
    def __init__(self, tunnel_id: _Optional[str] = ..., node_id: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., body: _Optional[bytes] = ..., credit: _Optional[int] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ..., assertion: _Optional[str] = ...) -> None: ...

class Caller(_message.Message):
    __slots__ = ("tenant_id", "partner_id", "user_id", "api_key_id", "role")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PARTNER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    partner_id: str
    user_id: str
    api_key_id: str
    role: str
    def __init__(self, tenant_id: _Optional[str] = ..., partner_id: _Optional[str] = ..., user_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class TunnelFrame(_message.Message):
    __slots__ = ("tunnel_id", "head", "data", "end")
    TUNNEL_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    tunnel_id: str
    head: TunnelHead
    data: bytes
    end: TunnelEnd
    def __init__(self, tunnel_id: _Optional[str] = ..., head: _Optional[_Union[TunnelHead, _Mapping]] = ..., data: _Optional[bytes] = ..., end: _Optional[_Union[TunnelEnd, _Mapping]] = ...) -> None: ...

class TunnelHead(_message.Message):
    __slots__ = ("status", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    status: int
    headers: _containers.ScalarMap[str, str]
    def __init__(self, status: _Optional[int] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TunnelEnd(_message.Message):
    __slots__ = ("error_code", "message")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    error_code: str
    message: str
    def __init__(self, error_code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class TunnelCancel(_message.Message):
    __slots__ = ("tunnel_id",)
    TUNNEL_ID_FIELD_NUMBER: _ClassVar[int]
    tunnel_id: str
    def __init__(self, tunnel_id: _Optional[str] = ...) -> None: ...

class TunnelCredit(_message.Message):
    __slots__ = ("tunnel_id", "frames")
    TUNNEL_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    tunnel_id: str
    frames: int
    def __init__(self, tunnel_id: _Optional[str] = ..., frames: _Optional[int] = ...) -> None: ...
