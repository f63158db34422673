"""ScaiInfer nodes: their heartbeats (the grpc mode's servicer), health by heartbeat age, the http process's directory
of them, the sweep job and the operators' listing."""
