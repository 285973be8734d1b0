"""Public biasmap ops (being written)."""
