"""The ScaiGrid appliance: its config, rendered files, `scaigrid-appliance` CLI, first boot and maintenance."""
