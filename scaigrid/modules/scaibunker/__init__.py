"""ScaiBunker: sandbox workers' storage proxy (its routes are also the whole of the bunker_proxy mode)."""

from migrations import MODULE_VERSIONS
from scaigrid.modules import Module
from scaigrid.modules.scaibunker import storage

MODULE = Module(
    id="scaibunker",
    migrations=MODULE_VERSIONS / "scaibunker" / "versions",
    routes=storage.ROUTES,
    permissions=("scaibunker:images:manage",),
)
