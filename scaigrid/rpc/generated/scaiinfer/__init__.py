"""scaiinfer protocol, generated."""
