"""Performance benchmark of the gateway: `make bench` runs bench/run.py and rewrites bench/RESULTS.md."""
