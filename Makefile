# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch only if the venv cannot import it yet (TORCH=... overrides the pin)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The whole pipeline on CPU (init -> ild -> smart -> kd -> dpo -> eval), then its report.
demo: install
	$(PY) -m zebra.hub fetch smollm2-135m-instruct
	$(PY) -m zebra.generate --model smollm2-135m-instruct --prompt "What is the capital of France?" --max-new-tokens 48
	$(PY) train.py configs/demo.yaml
	cat runs/demo/eval/report.md
	$(PY) -m zebra.generate --model runs/demo/dpo/model --prompt "What is the capital of France?" --max-new-tokens 24

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
