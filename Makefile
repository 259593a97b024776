.PHONY: demo test bench
demo:  ## the embedded simulation: a mass Spot reclaim and its effect on workloads
	scripts/demo
test:  ## everything CI runs: installs what it needs, lints, type-checks, tests
	scripts/test
bench:  ## speed and footprint figures (minutes)
	scripts/setup --test && .venv/bin/python bench/bench_agent.py
