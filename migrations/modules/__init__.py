"""One stream per built-in module, each declared by its Module (scaigrid/modules/<id>/__init__.py)."""
