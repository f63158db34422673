"""Outbound webhooks: subscriptions, the event outbox, and delivery by the worker."""
