"""argv -> command (main) and the flag types with their SPOTD_* environment defaults (flags)."""
