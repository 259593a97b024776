"""`spotd controller`: config, which nodes to drain (policy), drain jobs, what a pass publishes, the main loop."""
