"""`spotd status`: what spotd is doing to each node, and why each on-demand node is still here."""
