"""Integrations with training engines: ``hf`` (the transformers Trainer, any Trainer subclass),
``trl`` (TRL's trainers), ``gaudi`` (HPU trainers).

Each module imports its engine when it is imported itself; ``import paca`` imports none of them
(``paca.Trainer`` loads ``hf`` on first use). They use the public API and ``paca.adapters``; the
library below never imports them.
"""
