"""Backup, restore, support bundle and upgrade: each checks its input before it stops or changes anything."""
