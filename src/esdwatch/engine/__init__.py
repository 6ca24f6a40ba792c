"""The spectral engine: from weight matrices to typed reports.

Imports torch, numpy and scipy, and of esdwatch only :mod:`esdwatch.schema` (records, the
phase vocabulary) and :mod:`esdwatch.alarms` (``ModelReport.alarms``).

=====================  ==============================================================
module                 what it is for
=====================  ==============================================================
``layers``             which matrices of a model are analysed, and how they are oriented
``spectrum``           eigenvalues of W^T W (CPU BLAS path, torch path, GPU batches)
``threads``            per-thread caps on native thread pools, the engine's thread pool
``powerlaw``           the Clauset-Shalizi-Newman power-law fit of the ESD tail (alpha)
``mp``                 the Marchenko-Pastur fit of the bulk, Tracy-Widom edge, spikes
``metrics``            every per-layer metric from the eigenvalues (norms, entropy, ranks)
``phases``             the 5+1 phase classifier and its evidence
``traps``              the correlation-trap test (element-wise randomization)
``analyzer``           ``analyze`` / ``analyze_matrix`` / ``analyze_layers``: all of the above
``model_report``       :class:`ModelReport`, the offline result of ``analyze``
``synthetic``          ground-truth matrices of every phase, for tests and benchmarks
=====================  ==============================================================

The public names are re-exported by :mod:`esdwatch`. The measurements behind the
engine's design choices (timings, calibration tables) are in
``experiments/results/engine_design_notes.md``.
"""
