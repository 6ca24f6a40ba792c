"""Shared fixtures of the sink tests: synthetic snapshots, and a real Trainer on digits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from esdwatch import analyze_matrix
from esdwatch.engine.synthetic import make_phase_matrix
from esdwatch.schema import LayerRecord


def synthetic_snapshots(layers: Mapping[str, str], steps: Sequence[int]) -> dict[int, list[LayerRecord]]:
    """Per step, one record per layer: a 120 x 60 matrix of the named phase (seeded), with its eigenvalues."""
    return {
        step: [
            LayerRecord(
                step,
                0,
                1_700_000_000.0 + step,
                analyze_matrix(
                    make_phase_matrix(phase, 120, 60, seed=10 * k + i), name=name, keep_evals=True, traps=False
                ),
            )
            for i, (name, phase) in enumerate(layers.items())
        ]
        for k, step in enumerate(steps)
    }


def fit_digits(logger: Any, monitor: Any, max_steps: int) -> None:
    """Train the demo's digits MLP for ``max_steps`` with a real, quiet CPU ``lightning`` Trainer."""
    import lightning.pytorch as L

    from esdwatch.demo import DigitsDataModule, DigitsMLP

    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(DigitsMLP(hidden=(64, 64)), datamodule=DigitsDataModule(batch_size=32))
