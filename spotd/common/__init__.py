"""What every program needs and no domain knows: logging, the metrics registry, the health server, parsing."""
