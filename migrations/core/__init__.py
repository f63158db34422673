"""The core stream: the tables every ScaiGrid node has."""
