# secretgate — the two commands of the quick start:
#   make run    development gateway on 127.0.0.1:7443 (dev PKI, embedded store)
#   make test   fmt check, clippy -D warnings, every test
# Both install what they need (protoc, etcd) with apt-get when it is missing.
#
# Against a local 3-member etcd cluster (TLS everywhere), see docs/etcd.md:
#   make etcd-cluster   in one terminal (Ctrl-C stops all three members)
#   make run-etcd       in another: the development gateway with the etcd store
#
#   make bench          the gateway against etcd itself and its grpc-proxy (release build;
#                       BENCH_ARGS=--json for scripts)

SHELL := /bin/bash
CARGO ?= cargo
CARGO_BIN ?= $(if $(CARGO_HOME),$(CARGO_HOME),$(HOME)/.cargo)/bin

.PHONY: run test deps build fmt lint file-sizes install-link etcd-cluster etcd-pki run-etcd bench deploy-check python-client python-test

# No Rust file over this many lines (tests and benches included, no exemptions): a longer
# file is a module that wants to be split (STYLE.md).
MAX_FILE_LINES := 600

# Python tools for the checks (a venv in the checkout, made by `deps`): the Kubernetes
# manifests are validated against the schemas of this Kubernetes version.
VENV := .venv
KUBERNETES_VALIDATE := 1.37.0
KUBERNETES_VERSION := 1.35.0
# The Python client's tools and test runner (grpcio-tools, grpcio-reflection, pytest), pinned.
PYTHON_REQS := clients/python/requirements-dev.txt
PYTHON_STUBS := clients/python/secretgate/v1

# The local etcd cluster: state (PKI, data, logs) in .secretgate-dev/etcd/; delete it to
# start over. Client ports 12379, 22379, 32379; peer ports one above each.
ETCD_DIR := .secretgate-dev/etcd
ETCD_PORTS := 12379 22379 32379
ETCD_ENDPOINTS := https://127.0.0.1:12379,https://127.0.0.1:22379,https://127.0.0.1:32379

run: deps build install-link
	./target/debug/secretgate dev

test: deps file-sizes
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test
	$(CARGO) run -q --bin secretgate -- policy test --dir policies
	$(MAKE) -s deploy-check
	$(MAKE) -s python-test

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

# protoc builds the gRPC API (with the well-known types from libprotobuf-dev, which apt
# leaves out with --no-install-recommends); etcd and etcdctl run the replicated-store tests;
# systemd-analyze checks the systemd unit; promtool (Debian's prometheus package) checks
# the metrics exposition.
deps:
	@missing=""; \
	command -v protoc >/dev/null 2>&1 || missing="$$missing protobuf-compiler"; \
	[ -f /usr/include/google/protobuf/descriptor.proto ] || missing="$$missing libprotobuf-dev"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null 2>&1 || missing="$$missing etcd-client"; \
	command -v python3 >/dev/null 2>&1 || missing="$$missing python3"; \
	python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@[ -x $(VENV)/bin/kubernetes-validate ] && cmp -s $(PYTHON_REQS) $(VENV)/.python-client-reqs || { \
	  echo "installing kubernetes-validate $(KUBERNETES_VALIDATE) and $(PYTHON_REQS) into $(VENV)"; \
	  python3 -m venv $(VENV) && \
	  $(VENV)/bin/pip install -q kubernetes-validate==$(KUBERNETES_VALIDATE) -r $(PYTHON_REQS) && \
	  cp $(PYTHON_REQS) $(VENV)/.python-client-reqs; }

# The deployment files, checked by the real tools. The systemd unit by systemd itself: `verify` must have nothing to say (it exits 0
# on unknown keys, so any output fails), with ExecStart pointed at the binary just built.
deploy-check: deps build
	@tmp=$$(mktemp -d); \
	sed "s#/usr/local/bin/secretgate#$(CURDIR)/target/debug/secretgate#" \
	  deploy/systemd/secretgate.service > $$tmp/secretgate.service; \
	out=$$(systemd-analyze verify $$tmp/secretgate.service 2>&1); \
	score=$$(systemd-analyze security --offline=true $$tmp/secretgate.service 2>&1 | tail -1); \
	rm -rf $$tmp; \
	if [ -n "$$out" ]; then \
	  echo "$$out"; echo "deploy/systemd/secretgate.service: systemd-analyze verify complained"; exit 1; \
	fi; \
	echo "deploy/systemd/secretgate.service: systemd-analyze verify OK; $$score"
	@$(VENV)/bin/kubernetes-validate -k $(KUBERNETES_VERSION) --strict --quiet deploy/kubernetes/*.yaml
	@echo "deploy/kubernetes: every manifest valid for Kubernetes $(KUBERNETES_VERSION) (strict)"

# The Python client's gRPC stubs, generated from proto/ by grpcio-tools (never committed, so
# they cannot drift from the API).
python-client: deps
	@$(VENV)/bin/python -m grpc_tools.protoc -I proto --python_out=clients/python \
	  --grpc_python_out=clients/python proto/secretgate/v1/secrets.proto proto/secretgate/v1/admin.proto \
	  proto/secretgate/v1/control.proto

# The Python client against a real `secretgate dev` gateway (and grpcio-reflection's client).
python-test: python-client build
	SECRETGATE_BIN=$(CURDIR)/target/debug/secretgate PYTHONPATH=$(CURDIR)/clients/python \
	  $(VENV)/bin/python -m pytest -q -p no:cacheprovider clients/python

file-sizes:
	@long=$$(find src tests benches testkit -name '*.rs' -exec awk -v max=$(MAX_FILE_LINES) \
	  'END { if (NR > max) print FILENAME ": " NR " lines" }' {} \;); \
	if [ -n "$$long" ]; then \
	  echo "files over $(MAX_FILE_LINES) lines (split them):"; echo "$$long"; exit 1; \
	fi

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# A throw-away PKI for the local cluster: a CA, one member certificate (server and client
# use, for client and peer TLS) and the gateway's client certificate. Development only.
etcd-pki:
	@mkdir -p $(ETCD_DIR)/pki && chmod 700 $(ETCD_DIR) $(ETCD_DIR)/pki
	@cd $(ETCD_DIR)/pki && if [ ! -f gateway.pem ]; then \
	  set -e; umask 077; ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"; \
	  openssl req -x509 $$ec -keyout ca-key.pem -out ca.pem -days 365 \
	    -subj "/CN=secretgate dev etcd CA" 2>/dev/null; \
	  openssl req -new $$ec -keyout member-key.pem -out member.csr -subj "/CN=etcd member" 2>/dev/null; \
	  openssl x509 -req -in member.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 365 \
	    -out member.pem -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n") 2>/dev/null; \
	  openssl req -new $$ec -keyout gateway-key.pem -out gateway.csr -subj "/CN=secretgate" 2>/dev/null; \
	  openssl x509 -req -in gateway.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 365 \
	    -out gateway.pem -extfile <(printf "extendedKeyUsage=clientAuth\n") 2>/dev/null; \
	  rm -f *.csr; echo "wrote the dev etcd PKI in $(ETCD_DIR)/pki"; \
	fi

# A 3-member etcd, its grpc-proxy and two release gateways, started and stopped by the
# benchmark itself (benches/etcd.rs; BENCH_OPS, BENCH_CONCURRENCY, BENCH_ROUNDS,
# BENCH_SLICE_MS, BENCH_CONNECTIONS tune it).
bench: deps
	$(CARGO) bench --bench etcd -- $(BENCH_ARGS)

# Three members in the foreground with the production flags of docs/etcd.md (TLS for
# clients and peers, client certificates required, quota, auto-compaction).
etcd-cluster: deps etcd-pki
	@pki="$(CURDIR)/$(ETCD_DIR)/pki"; cluster=""; \
	for p in $(ETCD_PORTS); do cluster="$$cluster,m$$p=https://127.0.0.1:$$((p + 1))"; done; \
	trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT INT TERM; \
	for p in $(ETCD_PORTS); do \
	  etcd --name m$$p --data-dir $(ETCD_DIR)/m$$p \
	    --listen-client-urls https://127.0.0.1:$$p --advertise-client-urls https://127.0.0.1:$$p \
	    --listen-peer-urls https://127.0.0.1:$$((p + 1)) \
	    --initial-advertise-peer-urls https://127.0.0.1:$$((p + 1)) \
	    --initial-cluster "$${cluster#,}" --initial-cluster-state new \
	    --initial-cluster-token secretgate-dev \
	    --cert-file $$pki/member.pem --key-file $$pki/member-key.pem \
	    --trusted-ca-file $$pki/ca.pem --client-cert-auth \
	    --peer-cert-file $$pki/member.pem --peer-key-file $$pki/member-key.pem \
	    --peer-trusted-ca-file $$pki/ca.pem --peer-client-cert-auth \
	    --quota-backend-bytes 2147483648 \
	    --auto-compaction-mode periodic --auto-compaction-retention 1h \
	    --logger zap --log-outputs $(ETCD_DIR)/m$$p.log & \
	done; \
	echo "etcd cluster: $(ETCD_ENDPOINTS) (logs in $(ETCD_DIR)/*.log; Ctrl-C stops it)"; \
	echo "health:  ETCDCTL_API=3 etcdctl --endpoints $(ETCD_ENDPOINTS) --cacert $$pki/ca.pem \
	  --cert $$pki/gateway.pem --key $$pki/gateway-key.pem endpoint health"; \
	wait

# The development gateway (`secretgate dev`) with its store in the cluster above. The
# variables override the dev config; relative paths resolve against .secretgate-dev/.
run-etcd: deps build install-link etcd-pki
	SECRETGATE_STORE_BACKEND=etcd \
	SECRETGATE_STORE_ENDPOINTS=$(ETCD_ENDPOINTS) \
	SECRETGATE_STORE_CA=etcd/pki/ca.pem \
	SECRETGATE_STORE_CERT=etcd/pki/gateway.pem \
	SECRETGATE_STORE_KEY=etcd/pki/gateway-key.pem \
	./target/debug/secretgate dev
