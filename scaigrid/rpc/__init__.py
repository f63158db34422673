"""gRPC: the scaiinfer.v1 protocol (protos and the code generated from them), servicers and interceptors."""
