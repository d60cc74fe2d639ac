# The two commands a user needs: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test run clean

setup: $(STAMP)

# Torch goes in first, pinned, so nothing pulls the CUDA wheels on a CPU box.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[worker,test]'
	touch $(STAMP)

# WebRTC tests (marker netns) run in a private network namespace whose only interface is
# loopback: ICE never uses 127.0.0.1, and their media must not touch a real interface.
test: setup
	$(PY) -m pytest -m "not netns"
	tests/netns.sh $(PY) -m pytest -m netns

# Embedded Redis (unless REDIS_URL) + one worker + the gateway; Ctrl-C stops everything.
run: setup
	$(VENV)/bin/callcenter up

clean:
	rm -rf $(VENV) .pytest_cache
