"""The network architectures, one module each, attribute names equal to their checkpoint keys."""
