# Set-up and everyday targets. Every target creates .venv on first use.
#   make test                      lint + the whole test suite (CI runs this)
#   make demo                      start the embedded cluster, generate, print status, stop
#   make TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128 install   (CUDA machines)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo proto clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m workers.cpu_kernels
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

demo: $(STAMP)
	$(BIN)/python -m cluster.demo

# Regenerate the committed gRPC stubs (cluster/moecluster_pb2*.py*) from proto/; tests/api/test_stubs.py
# checks they match. protoc writes moecluster/v1/...; the stubs live in the cluster package instead.
PROTO_OUT := build/proto
proto: $(STAMP)
	rm -rf $(PROTO_OUT) && mkdir -p $(PROTO_OUT)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) proto/moecluster/v1/moecluster.proto
	cp $(PROTO_OUT)/moecluster/v1/moecluster_pb2.py $(PROTO_OUT)/moecluster/v1/moecluster_pb2.pyi cluster/
	sed 's/^from moecluster\.v1 import /from cluster import /' $(PROTO_OUT)/moecluster/v1/moecluster_pb2_grpc.py \
		> cluster/moecluster_pb2_grpc.py

clean:
	rm -rf $(VENV) build *.egg-info
