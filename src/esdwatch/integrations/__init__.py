"""Framework shells: the only place that imports a training framework.

* :mod:`esdwatch.integrations.lightning`: ``ESDMonitor`` for ``lightning.pytorch`` and
  ``pytorch_lightning`` (also importable as :mod:`esdwatch.lightning`).
* :mod:`esdwatch.integrations.huggingface`: ``ESDCallback`` for ``transformers.Trainer``
  (and trainers built on it; PEFT/LoRA models), also importable as ``esdwatch.ESDCallback``.

Each shell translates its framework's hooks into :class:`esdwatch.monitor.Monitor` calls
and takes its options from :mod:`esdwatch.monitor.options`; importing this package imports
no framework.
"""
