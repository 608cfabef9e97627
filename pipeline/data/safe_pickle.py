"""A restricted unpickler for the official CIFAR python-pickle release.

``pickle.load`` executes whatever callables a file names, so a tampered ``data_batch_1`` could
run arbitrary code. The official files only need builtin containers (opcodes, no globals) and
numpy's array reconstruction; every other global is refused before it is imported or called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from pipeline.data.samples import DataError

# (module, name) pairs the official CIFAR-10/100 files reference. Numpy 2 renamed numpy.core to
# numpy._core, and files pickled by Python 3 wrap latin-1 bytes in _codecs.encode.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})
# The largest official file (a CIFAR-100 train pickle) is ~155 MB; anything far beyond is not one.
MAX_PICKLE_BYTES = 512 << 20


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, *, source: str) -> None:
        # latin1 decodes the Python 2 str objects of the official files (keys, names, array data).
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise DataError(f"refusing to unpickle {module}.{name} from {self._source}: not part "
                            "of the official CIFAR format")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"refusing to unpickle a persistent id from {self._source}: not part of "
                        "the official CIFAR format")


def load_cifar_pickle(path: str | Path) -> dict[str, Any]:
    """Load one official CIFAR pickle (a dict) with only the globals that format needs."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise DataError(f"{path}: {size} bytes is too large for an official CIFAR pickle "
                        f"(limit {MAX_PICKLE_BYTES}).")
    with path.open("rb") as f:
        try:
            obj = _RestrictedUnpickler(f, source=str(path)).load()
        except DataError:
            raise
        # A damaged pickle fails in many ways (UnpicklingError, EOFError, ValueError, ...).
        except Exception as exc:
            raise DataError(f"{path}: not a readable CIFAR pickle: {type(exc).__name__}: "
                            f"{exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict (official CIFAR format), got "
                        f"{type(obj).__name__}.")
    return obj
