"""The ScaiGrid appliance: local stack, and later the config renderer and appliance CLI."""
