"""Stubs generated from proto/secretgate/v1 by grpcio-tools (`make python-client`)."""
