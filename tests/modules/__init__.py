"""Modules that exist only for tests, loaded through SCAIGRID_MODULES=tests.modules.<name>:MODULE."""
