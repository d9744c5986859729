"""Process-wide llama.cpp set-up shared by the engine and the GGUF tokenizer: logging and backend init.

llama-cpp-python installs a log callback that prints llama.cpp's whole loader dump to stderr. Here llama.cpp's log
goes to Python logging instead (logger "callstream.llm_engine.llama_cpp"): warnings and errors show by default,
the rest at DEBUG.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import llama_cpp as _llama_cpp

# The ctypes bindings' own annotations do not type-check cleanly (ctypes pointers vs NewType ints).
lc: Any = _llama_cpp

_log = logging.getLogger("callstream.llm_engine.llama_cpp")
# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous message).
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]
_lock = threading.Lock()
_ready = [False]


@lc.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    py_level = _last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level[0] = py_level
    if _log.isEnabledFor(py_level):
        message = text.decode("utf-8", errors="replace").rstrip()
        if message:
            _log.log(py_level, "%s", message)


def init_llama() -> None:
    """Route llama.cpp's log to Python logging and initialise its backend, once per process."""
    with _lock:
        if not _ready[0]:
            lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _ready[0] = True


def meta_str(model: Any, key: str) -> str | None:
    """A GGUF metadata value as text (e.g. "tokenizer.chat_template"), None when the key is absent."""
    size = 1 << 16
    buf = ctypes.create_string_buffer(size)
    n = int(lc.llama_model_meta_val_str(model, key.encode(), buf, size))
    if n < 0:
        return None
    if n >= size:  # a longer value (a big chat template): ask again with room for it
        buf = ctypes.create_string_buffer(n + 1)
        lc.llama_model_meta_val_str(model, key.encode(), buf, n + 1)
    return buf.value.decode("utf-8", errors="replace")
