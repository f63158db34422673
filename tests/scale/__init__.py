"""Tests beyond one machine: image, compose, Kubernetes, Galera, Sentinel (make test-scale)."""
