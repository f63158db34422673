"""A test module with no routes, jobs or tables: switching it on and off disturbs nothing else (the adversarial
table switches it for every kind of caller)."""

from scaigrid.modules import Module, Permission

MODULE = Module(
    id="quiet",
    permissions=(Permission("quiet:nothing:manage", "Manage nothing", "a permission nothing needs"),),
    display_name="Quiet",
    version="2.1.0",
    description="test module that does nothing",
    dependencies=("scaibunker",),
)
