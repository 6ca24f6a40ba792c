"""ESDCallback on a real ``transformers.Trainer``: a tiny BERT built from a config (no
download), generated token data, CPU. Dashboards are real: TensorBoard event files read
back with TensorBoard's EventAccumulator, a W&B offline run read back with wandb's own
reader. The DDP scenario runs this file under ``torch.distributed.run`` (2 processes, gloo)
in a subprocess with a timeout; each rank writes what it saw to ``rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _processes import run_bounded

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,  # noqa: E402
)

from esdwatch.engine.analyzer import analyze_layers  # noqa: E402
from esdwatch.engine.layers import find_layers  # noqa: E402
from esdwatch.integrations.huggingface import ESDCallback  # noqa: E402
from esdwatch.monitor import Monitor  # noqa: E402
from esdwatch.monitor.distributed import assign_owners, layer_cost  # noqa: E402
from esdwatch.rundir import read_alarms, read_distributed, read_records  # noqa: E402
from esdwatch.schema import summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 100, 16
OPTS = dict(min_evals=8, traps=False, on_backpressure="block")  # "block": every scheduled step is taken
#: the 15 matrices of the tiny BERT with >= 8 eigenvalues (token-type embeddings and classifier have 2)
LAYERS = (
    ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"]
    + [
        f"bert.encoder.layer.{i}.{m}"
        for i in (0, 1)
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
        + ("intermediate.dense", "output.dense")
    ]
    + ["bert.pooler.dense"]
)
METRICS = ("alpha", "xmin", "lambda_max", "stable_rank", "entropy", "log_norm", "mp_softrank", "num_spikes")
DDP_TIMEOUT_S = 180


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    """64 random sequences of 16 tokens, labelled by their first token."""

    def __init__(self, n: int = 64):
        self.x = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": int(self.x[i, 0] >= VOCAB // 2)}


def training_args(out: Path, **kwargs) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        save_strategy="no",
        logging_steps=5,
        seed=0,
    )
    return TrainingArguments(**{**base, **kwargs})


def train(out: Path, callbacks: list, model=None, resume: str | None = None, **kwargs) -> Trainer:
    trainer = Trainer(
        model=model if model is not None else tiny_bert(),
        args=training_args(out, **kwargs),
        train_dataset=Tokens(),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


class KeepWeights(TrainerCallback):
    """The weights after the optimizer step of each given global step (0: before training)."""

    def __init__(self, steps, save_to: Path | None = None):
        self.steps, self.save_to, self.weights, self.substeps = set(steps), save_to, {}, 0

    def _keep(self, state, model) -> None:
        if state.global_step in self.steps and state.is_world_process_zero:
            self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if self.save_to is not None:
                torch.save(self.weights[state.global_step], self.save_to / f"weights{state.global_step}.pt")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._keep(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._keep(state, model)

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1


class PoisonAt(TrainerCallback):
    """After the optimizer step of ``step`` (before ESDCallback's snapshot) fill ``layer``'s weight with NaN."""

    def __init__(self, step: int, layer: str):
        self.step, self.layer = step, layer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.get_submodule(self.layer).weight.fill_(float("nan"))


def assert_records_equal_analysis(records, weights: dict) -> None:
    """Each kept step's records equal a single-process analysis of the weights kept at that step."""
    config = Monitor(None, **OPTS).config
    for step, state_dict in weights.items():
        model = tiny_bert()
        model.load_state_dict(state_dict)
        expected = analyze_layers(find_layers(model, min_evals=8)[0], config)
        got = [r.report for r in records if r.global_step == step]
        assert [r.name for r in got] == [r.name for r in expected] == LAYERS, step
        for g, w in zip(got, expected):
            assert g.status == w.status == "ok"
            for m in METRICS:
                a, b = float(getattr(g, m)), float(getattr(w, m))
                assert a == pytest.approx(b, rel=1e-9, abs=1e-12), (step, g.name, m, a, b)


# ------------------------------------------------------------------- scheduled steps, TensorBoard


def test_records_at_the_scheduled_steps_and_tensorboard_beside_the_trainers_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    keep = KeepWeights({0, 5, 20})
    cb = ESDCallback(every_n_steps=5, at_start=True, keep_evals=True, **OPTS)
    trainer = train(tmp_path, [keep, cb], max_steps=20, report_to=["tensorboard"])
    tb_dir = Path(
        next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "TensorBoardCallback").logging_dir
    )
    assert tb_dir.parent == tmp_path / "runs"
    assert cb.monitor.output_dir == tb_dir / "esdwatch"  # the records live in the Trainer's TensorBoard run

    records = read_records(tb_dir / "esdwatch", dedupe=False)
    steps = (0, 5, 10, 15, 20)
    assert [(r.global_step, r.name) for r in records] == [(s, n) for s in steps for n in LAYERS]
    assert_records_equal_analysis(records, keep.weights)

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    assert [e.step for e in ea.Scalars("train/loss")] == [5, 10, 15, 20]  # the Trainer's own, same run
    for name in LAYERS:
        alpha = ea.Scalars(f"esdwatch/alpha/{name}")
        assert [e.step for e in alpha] == list(steps)
        want = [r.report.alpha for r in records if r.name == name]
        assert [e.value for e in alpha] == pytest.approx(want, rel=1e-6)
        hist = ea.Histograms(f"esdwatch/esd_log10_eigenvalues/{name}")
        assert [h.step for h in hist] == list(steps)
        assert hist[-1].histogram_value.num == next(
            r.report.num_evals for r in records[-len(LAYERS) :] if r.name == name
        )
    assert {"esdwatch/phase_map", f"esdwatch/esd_figure/{LAYERS[0]}"} <= set(tags["images"])
    summary = [e.value for e in ea.Scalars("esdwatch/summary/alpha")]
    # the model averages also went into the Trainer's log history, at each snapshot's step
    logged = [h for h in trainer.state.log_history if "esdwatch/summary/alpha" in h]
    assert [h["step"] for h in logged] == list(steps)
    for h, s, value in zip(logged, steps, summary):
        expected = summarize(r.report for r in records if r.global_step == s)["alpha"]
        assert h["esdwatch/summary/alpha"] == pytest.approx(expected, rel=1e-12)
        assert value == pytest.approx(expected, rel=1e-6)


def test_gradient_accumulation_snapshots_optimizer_steps_only(tmp_path):
    keep = KeepWeights({2, 8})
    cb = ESDCallback(every_n_steps=2, **OPTS)
    trainer = train(tmp_path, [keep, cb], max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert trainer.state.global_step == 8 and keep.substeps == 8  # 16 micro-batches, 8 optimizer steps
    records = read_records(cb.monitor.output_dir, dedupe=False)
    assert [(r.global_step, r.name) for r in records] == [(s, n) for s in (2, 4, 6, 8) for n in LAYERS]
    assert cb.monitor.snapshots == 4
    assert_records_equal_analysis(records, keep.weights)  # the weights right after each optimizer step


def test_every_n_epochs_snapshots_at_epoch_ends(tmp_path):
    cb = ESDCallback(every_n_epochs=1, **OPTS)
    train(tmp_path, [cb], max_steps=20)  # 8 steps per epoch: epochs end at 8, 16 and (cut short) 20
    records = read_records(cb.monitor.output_dir)
    assert [(r.global_step, r.epoch) for r in records[:: len(LAYERS)]] == [(8, 0), (16, 1), (20, 2)]


# ------------------------------------------------------------------- W&B


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var, sub in (("WANDB_DIR", "wb"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("WANDB_PROJECT", "esdwatch-test")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield wandb
    if wandb.run is not None:
        wandb.finish()


def wandb_log(run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb file, as wandb's own reader prints them."""
    exe = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    out = subprocess.run(
        [exe, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120, check=True
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_wandb_offline_run_holds_esdwatch_keys_on_the_trainers_step(tmp_path, offline_wandb):
    cb = ESDCallback(every_n_steps=5, keep_evals=True, sink_options={"figures": False}, **OPTS)
    train(tmp_path / "out", [cb], max_steps=10, report_to=["wandb"])
    run = offline_wandb.run
    assert run is not None  # the Trainer's WandbCallback started it; esdwatch wrote into it
    run_dir = Path(run.dir).parent
    offline_wandb.finish()
    log = wandb_log(run_dir)
    items = [r["history"]["item"] for r in log if r["type"] == "history"]
    ours = [it for it in items if f"esdwatch/alpha/{LAYERS[0]}" in it]
    assert [it["train/global_step"] for it in ours] == [5, 10]
    records = read_records(cb.monitor.output_dir)
    for it in ours:
        for rec in (r for r in records if r.global_step == it["train/global_step"]):
            assert it[f"esdwatch/alpha/{rec.name}"] == pytest.approx(rec.report.alpha, rel=1e-12)
            assert it[f"esdwatch/esd_log10_eigenvalues/{rec.name}._type"] == "histogram"
        assert "esdwatch/summary/alpha" in it
    assert [it["train/global_step"] for it in items if "train/loss" in it] == [5, 10]  # the Trainer's, same run
    metrics = [r["metric"] for r in log if r["type"] == "metric"]
    assert {"glob_name": "esdwatch/*", "step_metric": "train/global_step"}.items() <= next(
        m for m in metrics if m.get("glob_name") == "esdwatch/*"
    ).items()


# ------------------------------------------------------------------- alarms, resume


def test_a_nan_layer_stops_training_through_should_training_stop(tmp_path):
    layer = "bert.encoder.layer.1.attention.self.value"
    cb = ESDCallback(every_n_steps=3, max_pending=1, **OPTS)  # one in flight: the next snapshot waits for it
    trainer = train(tmp_path, [PoisonAt(6, layer), cb], max_steps=60)
    # the snapshot of step 6 is analysed in the background; its non_finite alarm (action "stop") is handled
    # at step 7, 8 or at the latest at 9 (the next snapshot waits for it)
    assert trainer.control.should_training_stop
    assert 7 <= trainer.state.global_step <= 9
    alarms = [a for a in read_alarms(cb.monitor.output_dir) if a.kind == "non_finite"]
    assert [a.layer for a in alarms if a.step == 6] == [layer]  # later snapshots: the NaN spread by then
    assert (cb.monitor.stop_reasons[0].kind, cb.monitor.stop_reasons[0].layer) == ("non_finite", layer)


@pytest.mark.parametrize("restore", [False, True], ids=["esdwatch-reads-the-state", "trainer-rebuilds-callback"])
def test_resume_from_a_trainer_checkpoint_keeps_one_record_per_step_and_layer(tmp_path, restore):
    first = ESDCallback(every_n_steps=4, at_start=True, **OPTS)
    train(tmp_path, [first], max_steps=16, save_strategy="steps", save_steps=10)
    ckpt = tmp_path / "checkpoint-10"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["ESDCallback"]
    state = saved["attributes"]["esdwatch_state"]
    assert (state["last_step"], state["last_snapshot_step"], state["segment"]) == (10, 8, 0)
    assert saved["args"] == {"every_n_steps": 4, "at_start": True, **OPTS}

    second = ESDCallback(every_n_steps=4, at_start=True, **OPTS)
    trainer = train(
        tmp_path,
        [second],
        max_steps=18,
        save_strategy="steps",
        save_steps=10,
        resume=str(ckpt),
        restore_callback_states_from_checkpoint=restore,
    )
    # restore_callback_states_from_checkpoint=True: the Trainer replaced `second` by ESDCallback(**saved args)
    (cb,) = (c for c in trainer.callback_handler.callbacks if isinstance(c, ESDCallback))
    assert (cb is second) is not restore and cb.options == second.options
    assert cb.monitor.segment == 1
    got = [(r.global_step, r.name, r.segment) for r in read_records(cb.monitor.output_dir)]
    expected = [(s, n, 0) for s in (0, 4, 8) for n in LAYERS] + [(s, n, 1) for s in (12, 16, 18) for n in LAYERS]
    assert got == expected  # no second baseline, no gap at 12, what the first run wrote after 10 superseded


# ------------------------------------------------------------------- PEFT


def test_peft_lora_adapters_are_watched_with_r_eigenvalues_each(tmp_path):
    peft = pytest.importorskip("peft")
    r = 4
    model = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=r, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    cb = ESDCallback(every_n_steps=5, traps=False, on_backpressure="block", peft_base_at_start=True)
    train(tmp_path, [cb], model=model, max_steps=10)
    records = read_records(cb.monitor.output_dir)
    adapters = [
        f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_BA"
        for i in (0, 1)
        for m in ("query", "value")
    ]
    assert [(x.global_step, x.name) for x in records] == [(s, n) for s in (5, 10) for n in adapters]
    for rec in records:
        assert rec.report.kind == "lora" and rec.report.num_evals == r and rec.report.status == "ok"
    for rec in (x for x in records if x.global_step == 10):  # the final weights: lambda_max of s * B @ A
        mod = model.get_submodule(rec.name.removesuffix(".lora_BA"))
        delta = mod.scaling["default"] * mod.lora_B["default"].weight.double() @ mod.lora_A["default"].weight.double()
        assert rec.report.lambda_max == pytest.approx(float(torch.linalg.svdvals(delta)[0]) ** 2, rel=1e-5)
    base = read_records(cb.monitor.output_dir / "base")  # peft_base_at_start: the frozen layers, once
    assert {x.global_step for x in base} == {0} and not any("lora" in x.name for x in base)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer" in {x.name for x in base}


# ------------------------------------------------------------------- options, imports


def test_importing_esdwatch_imports_no_transformers_and_bad_options_fail_at_construction():
    import inspect

    from transformers.trainer_callback import ExportableState

    import esdwatch

    code = (
        "import sys, esdwatch, esdwatch.integrations.huggingface\n"
        "assert not {'transformers', 'peft', 'trl'} & set(sys.modules), sorted(sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert esdwatch.ESDCallback is ESDCallback and issubclass(ESDCallback, (TrainerCallback, ExportableState))
    params = inspect.signature(ESDCallback.__init__).parameters  # stamped from esdwatch.monitor.options
    assert {"every_n_steps", "analysis", "sink_options", "log_summary", "peft_base_at_start"} <= set(params)
    for bad, message in (
        (dict(every_n_steps=0), "every_n_steps"),
        (dict(sink_options={"nope": 1}), "sink_options"),
        (dict(worker="gpu"), "worker"),
    ):
        with pytest.raises(ValueError, match=message):
            ESDCallback(**bad)
    with pytest.raises(TypeError, match="every_n_step"):
        ESDCallback(every_n_step=5)


def test_two_unnamed_callbacks_on_one_trainer_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="two ESDCallbacks"):
        train(tmp_path, [ESDCallback(every_n_steps=5, **OPTS), ESDCallback(every_n_steps=7, **OPTS)], max_steps=2)


# ------------------------------------------------------------------- README


def test_readme_hugging_face_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Hugging Face\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace = {"model": tiny_bert(), "train_dataset": Tokens()}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    dense, lora = (read_records(next(Path(out).glob("runs/*/esdwatch"))) for out in ("out", "out-lora"))
    assert {r.global_step for r in dense} == {100, 200} and all(r.report.kind != "lora" for r in dense)
    assert {r.global_step for r in lora} == {100, 200} and all(r.report.kind == "lora" for r in lora)
    assert {r.global_step for r in read_records(next(Path("out-lora").glob("runs/*/esdwatch/base")))} == {0}
    assert list(Path("out").glob("runs/*/events.out.tfevents.*"))


# ------------------------------------------------------------------- DDP


def _owners() -> dict[str, int]:
    mats = find_layers(tiny_bert(), min_evals=8)[0]
    return dict(zip([m.name for m in mats], assign_owners([layer_cost(m) for m in mats], 2)))


class Report(TrainerCallback):
    def __init__(self, out: Path, cb):
        self.out, self.cb = out, cb

    def on_train_end(self, args, state, control, **kwargs):
        mon = self.cb.monitor
        info = dict(
            rank=args.process_index,
            world_size=args.world_size,
            global_step=state.global_step,
            should_training_stop=control.should_training_stop,
            snapshots=mon.snapshots,
            owners=mon.owners,
            layers_analysed=mon.stats["layers_analysed"],
            stop_reasons=[(a.kind, a.layer, a.step) for a in mon.stop_reasons],
        )
        (self.out / f"rank{args.process_index}.json").write_text(json.dumps(info))


def _ddp_worker(out: Path) -> None:
    """One rank of ``torch.distributed.run --nproc_per_node 2``: poison a layer of rank 1 at step 12."""
    torch.set_num_threads(1)
    layer = next(n for n, r in _owners().items() if r == 1)
    cb = ESDCallback(every_n_steps=4, logger_sinks=False, **OPTS)
    callbacks = [KeepWeights({8}, save_to=out), PoisonAt(12, layer), cb]
    callbacks.append(Report(out, cb))
    train(out, callbacks, max_steps=40, ddp_backend="gloo")
    # Trainer leaves the process group alive; gloo's threads then abort the process at interpreter exit
    # ("terminate called without an active exception", pytorch/pytorch#190489) unless it is destroyed first.
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_share_the_layers_match_one_process_and_stop_together(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    returncode, output = run_bounded(
        [*cmd, __file__, "ddp", str(tmp_path)], env=env, timeout_s=DDP_TIMEOUT_S, what="the 2-process run"
    )
    assert returncode == 0, output[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    owners = _owners()
    layer = next(n for n, r in owners.items() if r == 1)
    assert r0["world_size"] == r1["world_size"] == 2
    # the layers were shared: the cost-balanced split, both ranks analysed their part of every snapshot
    assert r0["owners"] == r1["owners"] == owners and set(owners.values()) == {0, 1}
    n1 = sum(1 for r in owners.values() if r == 1)
    # the snapshot of step 12 (layer poisoned just before) was analysed by rank 1; its non_finite alarm
    # (action "stop") reached rank 0 at an exchange, and both ranks stopped there together: at step 16
    # usually, at step 12 itself when rank 1's analysis finished before that exchange (seen on a loaded
    # machine: the byte budget hands results back as soon as they are ready)
    stop_step = r0["global_step"]
    assert r1["global_step"] == stop_step and stop_step in (12, 16)
    steps = tuple(range(4, stop_step + 1, 4))
    assert (r0["layers_analysed"], r1["layers_analysed"]) == (len(steps) * (len(LAYERS) - n1), len(steps) * n1)
    assert r0["should_training_stop"] and r1["should_training_stop"]
    assert r0["stop_reasons"][0] == ["non_finite", layer, 12]
    out = next(tmp_path.glob("runs/*/esdwatch"))
    raw = [(r.global_step, r.name) for r in read_records(out, dedupe=False)]
    assert raw == [(s, n) for s in steps for n in LAYERS]  # written once, by rank 0
    assert all(d["owners"] == owners and d["world_size"] == 2 for d in read_distributed(out))
    # rank 0's records at step 8 equal a single-process analysis of the same weights
    assert_records_equal_analysis(read_records(out), {8: torch.load(tmp_path / "weights8.pt")})


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "ddp":
    _ddp_worker(Path(sys.argv[2]))
