"""gRPC plumbing: the protocols (protos and the code generated from them, codegen.py) and the interceptors."""
