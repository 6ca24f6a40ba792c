"""Pictures and pages from records: figures (matplotlib) and the static HTML report.

* :mod:`esdwatch.reporting.figures`: ESD figures with their fits, the phase map, metric
  trajectories (used by the TensorBoard and W&B sinks and by the report);
* :mod:`esdwatch.reporting.html`: ``esdwatch report LOG_DIR``, a static page with PNGs.
"""
