"""The worker: scheduled jobs of core and modules, run once per tick across all worker processes."""
