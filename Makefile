# make demo  - set up a virtual environment and train prior-separated SASRec on ml-100k
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

demo: setup
	$(PY) run_recbole_popprior.py --model=SASRec --dataset=ml-100k --config_files=properties/demo.yaml

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_train_overhead.py --quick
	$(PY) benchmarks/bench_eval_overhead.py --quick
	$(PY) benchmarks/bench_convert.py --rows=10000000
	$(PY) benchmarks/bench_sampled_softmax.py
	$(PY) benchmarks/bench_scale.py --rows 1000000 10000000
	$(PY) benchmarks/bench_step.py --quick --eval
