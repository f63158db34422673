"""scaiinfer.v1, generated from scaigrid/rpc/protos/scaiinfer/v1/scaiinfer.proto."""
