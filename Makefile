# Set-up is implicit: every target creates .venv and installs rayseg (with dev extras) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-quick test-cluster cluster-try lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rayseg demo --out rayseg_demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# For iteration: leaves out the tests marked slow (the namespace cluster, a real head with job
# submission, S3 round trips, two-node and killed-process runs); `make test` is the reference.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow and not cluster_faults'

# Every case on the namespace cluster of tests/cluster (root and Linux namespaces; ~5 min idle).
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m '' tests/cluster

# A head, three workers and a client as separate hosts on this machine; runs the demo job.
cluster-try: $(STAMP)
	$(BIN)/python tests/cluster/nscluster.py try

lint: $(STAMP)
	$(BIN)/ruff check rayseg jobs tests bench

bench: $(STAMP)
	$(BIN)/python bench/subset_bench.py
	$(BIN)/python bench/render_bench.py
	$(BIN)/python bench/percore_bench.py
	$(BIN)/python bench/driver_bench.py
	$(BIN)/python bench/scale_bench.py
	$(BIN)/python bench/shard_size_bench.py
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/ingest_bench.py --images 2000 --json bench/results/ingest_bench.json
	$(BIN)/python bench/paired_bench.py --change groups --rounds 20 --json bench/results/groups_bench.json
	$(BIN)/python bench/paired_bench.py --change chunks --rounds 14 --json bench/results/chunks_bench.json
	$(BIN)/python bench/paired_bench.py --change reuse --rounds 14 --json bench/results/reuse_bench.json
	$(BIN)/python bench/paired_bench.py --change memory --rounds 20 --json bench/results/memory_bench.json

clean:
	rm -rf rayseg_demo bench/_data bench/_out .pytest_cache
