"""ScaiBunker: sandbox workers' storage proxy (its object routes are also the whole of the bunker_proxy mode)."""

from scaigrid.modules import Module
from scaigrid.modules.scaibunker import jobs, minting, routes

MODULE = Module(
    id="scaibunker",
    migrations="migrations.modules.scaibunker.versions",
    # Minting needs the database (it records each capability): the http process only. bunker_proxy mounts
    # routes.ROUTES alone.
    routes=(*minting.ROUTES, *routes.ROUTES),
    jobs=jobs.JOBS,
    permissions=(minting.PERMISSION,),
)
