"""ScaiBunker's worker job: records of expired storage capabilities are deleted."""

import logging

from sqlalchemy import delete

from scaigrid.clock import utc_now
from scaigrid.db import delete_in_batches
from scaigrid.modules.scaibunker.tables import capabilities
from scaigrid.worker.jobs import Job, JobContext

logger = logging.getLogger(__name__)


async def purge_expired_capabilities(ctx: JobContext) -> None:
    """Hourly: an expired capability is refused by its own `exp` wherever it is shown, so its record has no use left.
    The table only grows with minting, and sandboxes mint often; an hour of expired rows is little."""
    deleted = await delete_in_batches(ctx.engine, delete(capabilities).where(capabilities.c.expires_at < utc_now()))
    if deleted:
        logger.info("deleted %d expired storage capability record(s)", deleted,
                    extra={"event": "storage_capabilities_purged", "count": deleted})


JOBS = (Job("scaibunker_capabilities_purge", purge_expired_capabilities, every_s=3600, timeout_s=120),)
