"""Errors of the model store: every message names the model, file or field at fault."""


class StoreError(Exception):
    """An import or lookup in the model store that failed; nothing half-written is left behind."""
