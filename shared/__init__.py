"""Tether: edge-and-cloud hybrid inference; the shared edge/cloud contract."""

__version__ = "0.1.0"
