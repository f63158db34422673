"""Helpers the tests share: waiting for events, `scaigrid` subprocesses, HTTP, node settings, databases."""
