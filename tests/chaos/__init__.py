"""The chaos run's parts: a steady mixed load through nginx (load.py) and what it left behind, checked (audit.py)."""
