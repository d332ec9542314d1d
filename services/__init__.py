"""Tandem's services: one package per gRPC service (tokenizer, worker, router, kvstore, gateway,
controller), each with a thin main.py, a server.py and one file per concept."""
