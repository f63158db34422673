"""Code generated from scaigrid/rpc/protos by `python -m scaigrid.rpc.codegen`; never edited by hand."""
