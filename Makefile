# secretgate — the two commands of the quick start:
#   make run    development gateway on 127.0.0.1:7443 (dev PKI, embedded store)
#   make test   fmt check, clippy -D warnings, every test
# Both install what they need (protoc, etcd) with apt-get when it is missing.

SHELL := /bin/bash
CARGO ?= cargo
CARGO_BIN ?= $(if $(CARGO_HOME),$(CARGO_HOME),$(HOME)/.cargo)/bin

.PHONY: run test deps build fmt lint install-link

run: deps build install-link
	./target/debug/secretgate dev

test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test
	$(CARGO) run -q --bin secretgate -- policy test --dir policies

build:
	$(CARGO) build --bin secretgate

# Put `secretgate` on the PATH (a symlink into cargo's bin directory, which rustup puts on
# the PATH) so the CLI examples in the README work from this checkout.
install-link: build
	@if [ -d "$(CARGO_BIN)" ]; then \
	  ln -sf "$(CURDIR)/target/debug/secretgate" "$(CARGO_BIN)/secretgate"; \
	  echo "linked $(CARGO_BIN)/secretgate -> target/debug/secretgate"; \
	else \
	  echo "note: $(CARGO_BIN) not found; use $(CURDIR)/target/debug/secretgate"; \
	fi

# protoc builds the gRPC API; etcd and etcdctl run the replicated-store tests.
deps:
	@missing=""; \
	command -v protoc >/dev/null 2>&1 || missing="$$missing protobuf-compiler"; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null 2>&1 || missing="$$missing etcd-client"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --all-targets -- -D warnings
