"""Frozen text encoders behind one interface (strings -> token features + mask)."""
