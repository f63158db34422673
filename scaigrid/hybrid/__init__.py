"""The hybrid deployment: a managed ScaiGrid and the appliances (nodes) enrolled with it (docs/hybrid.md)."""
