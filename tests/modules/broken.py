"""A test module whose only migration fails, to show that one module's failure leaves the others migrated."""

from scaigrid.modules import Module

MODULE = Module(id="broken", migrations="tests.modules.broken_versions", display_name="Broken", version="0.0.1",
                description="test module whose migration fails")
