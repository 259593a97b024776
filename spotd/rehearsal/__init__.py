"""`spotd simulate-reclaim`: the command (command), target choice (targets), the run (runner), AWS paths
(aws), the report (report, pure)."""
