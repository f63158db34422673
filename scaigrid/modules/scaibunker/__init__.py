"""ScaiBunker: sandbox workers' storage proxy (its object routes are also the whole of the bunker_proxy mode)."""

from scaigrid.modules import Module, Permission
from scaigrid.modules.scaibunker import jobs, minting, routes

MODULE = Module(
    id="scaibunker",
    migrations="migrations.modules.scaibunker.versions",
    # Minting needs the database (it records each capability): the http process only. bunker_proxy mounts
    # routes.ROUTES alone.
    routes=(*minting.ROUTES, *routes.ROUTES),
    jobs=jobs.JOBS,
    permissions=(Permission(minting.PERMISSION, "Manage storage",
                            "mint storage capabilities that let sandbox workers read and write the tenant's "
                            "snapshots, images and audit batches"),),
    display_name="ScaiBunker",
    version="1.0.0",
    description="sandbox workers' storage: snapshots, images and audit batches through the storage proxy, with "
                "capabilities instead of S3 credentials",
)
