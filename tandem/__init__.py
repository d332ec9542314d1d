"""Generated gRPC/protobuf stubs for protos/tandem/v1 (made by `make protos`; never edit)."""
