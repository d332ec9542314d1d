"""Tandem's common library: model families, the model store, tokenizers, and (as they land) the
engine, protos glue and configuration shared by every service."""
