# Every target creates the environment it needs on a fresh machine (once; redone when pyproject changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision from PyPI; override for another CUDA/CPU build, e.g. TORCH_PKGS="torch torchvision"
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
DATA   ?= $(IPSD_DATA)
STAMP  := $(VENV)/.installed
FFCV_LIBS := libturbojpeg0-dev libopencv-dev pkg-config

LAUNCHER ?= gpus
TABLES := table2 table3 table4 table5 table15
DATA_ARG = $(if $(DATA),data_root=$(DATA))

CPU_TABLES := table3 table15 table1 table10 table11 table12 table14
SMOKE_TABLES := table13  # Table 13's cpu profile (36 IPS runs) is past this machine's hour for Tables 10-14
UNDERFIT_TABLES := table3 table15 table1  # their first cpu profile (finished; Hard Label does not memorise there)
CPU_OUT := results/cpu/runs

.PHONY: help env demo test bench gpu-check regress clean publish-cpu $(TABLES) $(TABLES:%=%-smoke)

help:
	@echo "make publish-cpu DATA=DIR   the cpu profiles of Tables 3, 15, 1, 10-12, 14 (13: smoke) on this CPU (finishes what is missing), rendered into results/cpu/<table>/"
	@echo "make demo [DATA=DIR]   set up, train IPS and Hard Label on a small real subset, compare"
	@echo "make test              set up and run the test suite (IPSD_DATA=DIR enables CIFAR tests)"
	@echo "make bench             set up and run 'ipsd bench' on this machine"
	@echo "make gpu-check [DATA=DIR]   GPU readiness in < 8 min (speed per precision/layout/compile, engine checks, NCCL): runs/gpu-check/"
	@echo "make regress [DATA=DIR]   regression gate: every method's tiny CIFAR-10 run against results/regress/"
	@echo "make table3 [DATA=DIR] [LAUNCHER=gpus|local|torchrun|slurm]  full protocol (3 seeds), then the report"
	@echo "make table3-smoke DATA=DIR   the same, end to end, on a CIFAR-10 subset on CPU in minutes"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PKGS)
	$(BIN)/pip install --quiet -e '.[dev]'
	if pkg-config --exists libturbojpeg opencv4 2>/dev/null; then $(BIN)/pip install --quiet -e '.[ffcv]'; \
	else echo "note: FFCV not installed (loader=ffcv unavailable): needs $(FFCV_LIBS)"; fi
	touch $@

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/ipsd demo $(if $(DATA),--data $(DATA))

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/ipsd bench --json runs/bench.json

gpu-check: $(STAMP)
	PYTHONPATH=. $(BIN)/python benchmarks/gpu_check.py --out runs/gpu-check $(if $(DATA),--data $(DATA))

regress: $(STAMP)
	$(BIN)/ipsd regress $(DATA_ARG)

$(TABLES): $(STAMP)
	$(BIN)/ipsd sweep benchmarks/$@.yaml --launcher $(LAUNCHER) $(DATA_ARG)
	$(BIN)/ipsd report benchmarks/$@.yaml $(DATA_ARG)

$(TABLES:%=%-smoke): %-smoke: $(STAMP)
	$(BIN)/ipsd sweep benchmarks/$*.yaml --profile smoke --launcher local $(DATA_ARG)
	$(BIN)/ipsd report benchmarks/$*.yaml --profile smoke $(DATA_ARG)

clean:
	rm -rf $(VENV) runs .pytest_cache

# The published CPU tables: sweep what is missing (one one-thread job per core, the default on CPU), then render each table from its records.
publish-cpu: $(STAMP)
	for t in $(CPU_TABLES); do $(BIN)/ipsd sweep benchmarks/$$t.yaml --profile cpu --launcher local $(DATA_ARG) out=$(CPU_OUT) || exit 1; done
	for t in $(SMOKE_TABLES); do $(BIN)/ipsd sweep benchmarks/$$t.yaml --profile smoke --launcher local $(DATA_ARG) out=$(CPU_OUT) || exit 1; done
	$(MAKE) render-cpu

# Each rendered file is written whole or not at all (a failing report leaves the previous one).
render-cpu: $(STAMP)
	set -e; for tp in $(CPU_TABLES:%=%:cpu) $(UNDERFIT_TABLES:%=%:cpu_underfit) $(SMOKE_TABLES:%=%:smoke); do t=$${tp%:*}; p=$${tp#*:}; mkdir -p results/cpu/$$t; \
	  for f in md csv tex; do $(BIN)/ipsd report benchmarks/$$t.yaml --profile $$p --format $$f $(DATA_ARG) out=$(CPU_OUT) \
	    > results/cpu/$$t/$$t-$$p.$$f.tmp; mv results/cpu/$$t/$$t-$$p.$$f.tmp results/cpu/$$t/$$t-$$p.$$f; done; \
	  cp $(CPU_OUT)/reports/$$t-$$p-*.png results/cpu/$$t/; done
	set -e; for p in cpu cpu_underfit; do f=results/cpu/table1/table1-$$p-train.md; \
	  $(BIN)/ipsd report benchmarks/table1.yaml --profile $$p --metric train --format md $(DATA_ARG) out=$(CPU_OUT) > $$f.tmp; \
	  mv $$f.tmp $$f; done
