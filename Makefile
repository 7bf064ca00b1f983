# make demo  - set up a virtual environment, then RecBole's SASRec vs the prior-separated SASRec on
#              generated data with known truth (about a minute on 2 CPU cores; ends with a short table)
# make test  - set up the same environment and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

$(VENV)/.installed: setup.cfg setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel first: an unpinned torch would pull several GB of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,postgres]"
	touch $@

.PHONY: setup demo test bench
setup: $(VENV)/.installed

# One torch thread: the demo's model is tiny, so a second thread gains little and, on a shared
# machine, threads that wait for each other cost several times the work (measured: README, Quick start).
DEMO_OUT ?= saved/demo
demo: setup
	OMP_NUM_THREADS=1 $(PY) run_recbole_popprior.py --compare --model=SASRec --dataset=synthetic --seeds=1 \
	    --config_files=properties/demo.yaml --output=$(DEMO_OUT) --data_path=$(DEMO_OUT)/data

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_train_overhead.py --quick
	$(PY) benchmarks/bench_eval_overhead.py --quick
	$(PY) benchmarks/bench_convert.py --rows=10000000
	$(PY) benchmarks/bench_sampled_softmax.py
	$(PY) benchmarks/bench_scale.py --rows 1000000 10000000
