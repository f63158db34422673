"""A test module whose only migration fails, to show that one module's failure leaves the others migrated."""

from pathlib import Path

from scaigrid.modules import Module

MODULE = Module(id="broken", migrations=Path(__file__).parent / "broken_versions")
