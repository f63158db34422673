"""HTTP surfaces (aiohttp): the node's API app and the stateless storage-proxy app share this base."""
