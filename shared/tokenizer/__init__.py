"""Text <-> token ids with a model's own tokenizer and chat template."""

from shared.tokenizer.chat_template import ChatTemplateError
from shared.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplateError", "Tokenizer"]
