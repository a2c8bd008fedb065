"""Adapter files: every format paca writes or reads, behind ``save_adapter``/``load_adapter``.

* ``paca_format``: paca's own format (the default) and the two entry points;
* ``peft_paca``: PEFT's own PaCA format (``save_adapter(..., format="peft")``);
* ``lora``: ``export_lora``, an exactly equivalent PEFT LoRA adapter (servers);
* ``gguf_export``: ``write_gguf`` (a merged model for llama.cpp) and ``export_gguf_lora``;
* ``foreign``: readers of PEFT's and the PaCA authors' PaCA files;
* ``common``: file names, the one atomic writer, the "tensors to CPU" helper.

Imports: ``paca.model`` and below; nothing in the library imports this package but
``paca/__init__.py`` and the integrations.
"""

from paca.adapters.common import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_WEIGHTS
from paca.adapters.gguf_export import export_gguf_lora, write_gguf
from paca.adapters.lora import export_lora
from paca.adapters.paca_format import FORMATS, load_adapter, save_adapter

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FORMATS",
    "PEFT_WEIGHTS",
    "export_gguf_lora",
    "export_lora",
    "load_adapter",
    "save_adapter",
    "write_gguf",
]
