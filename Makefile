# Two commands do all the set-up: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qtrain-installed
DATA   ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
ifneq ($(DATA),)
export QTRAIN_DATA ?= $(DATA)
endif

.PHONY: install run test lint repro-ste-mnist repro-ste-mnist-check bench figures report clean

# Re-install only when the project metadata changes (a second `make` does nothing).
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/qtrain $(ARGS)

test: install
	$(VENV)/bin/pytest -q $(ARGS)

# undefined names, unused imports, syntax errors (pyproject.toml [tool.ruff.lint])
lint: install
	$(VENV)/bin/ruff check qtrain tests scripts

# [STE] Table 1, MNIST block: float LeNet-5 (trained once per seed, cached) then all 6 cells.
# resume=true: cells already finished are skipped, interrupted ones continue.
SEEDS ?= 0,1
comma := ,
space := $(subst ,, )
STE_MNIST := $(subst $(space),$(comma),$(strip $(foreach b,2 4,$(foreach s,identity relu clipped_relu,ste/mnist_lenet5_a$(b)_$(s)))))
repro-ste-mnist: install
	$(VENV)/bin/qtrain -m experiment=$(STE_MNIST) seed=$(SEEDS) resume=true progress=false $(ARGS)

figures: install
	$(PY) scripts/theory_figures.py --out docs

report: install
	$(VENV)/bin/qtrain-report results/ --write RESULTS.md --plot docs/ste_mnist_curves.png --match ste/mnist
	@# one figure per CIFAR campaign: part 8's (1/10 float start) and part 10's (full-recipe float start)
	$(VENV)/bin/qtrain-report results/cifar10_resnet20_s01 --plot docs/cifar10_resnet20_curves.png \
		--match cifar10_resnet20 --exclude instability > /dev/null
	$(VENV)/bin/qtrain-report results/cifar10_resnet20_s01 --plot docs/cifar10_resnet20_instability.png \
		--match a4_instability > /dev/null
	$(VENV)/bin/qtrain-report results/cifar10_resnet20_fullfloat --plot docs/cifar10_resnet20_fullfloat_curves.png \
		--match cifar10_resnet20 --exclude instability > /dev/null
	$(VENV)/bin/qtrain-report results/cifar10_resnet20_fullfloat \
		--plot docs/cifar10_resnet20_fullfloat_instability.png --match a4_instability > /dev/null

bench: install
	$(VENV)/bin/qtrain-bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
