"""Project-wide definitions that every layer may import: no torch, no Lightning."""
