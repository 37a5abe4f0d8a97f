"""A pack whose dependency is not installed (its requirements.txt names it)."""

import definitely_missing_module_xyz  # noqa: F401

NODE_CLASS_MAPPINGS = {}
