"""`spotd agent`, one per node: config and wiring (main), what to do about a notice (policy), acting on it
(responder)."""
