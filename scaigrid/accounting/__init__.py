"""Rate limits, usage accounting and budgets: counted in Redis on the hot path, flushed to MariaDB by the worker."""
