"""Imported by name after the pack put its folder on sys.path (another common pattern)."""

import server

RESOLVED = [server.__name__]
