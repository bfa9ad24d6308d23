"""Nodes of this topic (filled in by its issue)."""
from __future__ import annotations

NODES: list = []
