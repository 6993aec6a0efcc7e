"""The pieces of `train()` alone: optimiser groups, checkpoint round-trip, one step, evaluation, data, schedule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_finetune import make_records, small_cfg
from torch import nn

import llama_adapter as la
from llama_adapter.cli import main as cli_main
from llama_adapter.errors import TemplateError, TrainingError, UserError
from llama_adapter.templates import load_template
from llama_adapter.training import checkpointing, distributed, loop
from llama_adapter.training.config import TrainConfig
from llama_adapter.training.data import collate, epoch_plan
from llama_adapter.training.loss import batch_loss
from llama_adapter.training.schedule import lr_factor, step_counts
from llama_adapter.zero_init_attention import AdapterConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_model(tiny_base: Path) -> la.Transformer:
    return la.load_model(tiny_base, dtype=torch.float32)


@pytest.fixture
def run(tmp_path: Path, base_model: la.Transformer) -> loop.Run:
    cfg = small_cfg(tmp_path, Path("x"), epochs=2, batch_size=4, micro_batch=2)
    return loop.prepare(cfg, base_model, make_records(8), make_records(4, seed=1))


# ---- optimiser -------------------------------------------------------------------------------------------
def test_optimizer_groups_no_decay_for_gates_and_1d(base_model: la.Transformer) -> None:
    adapter = base_model.add_adapter("groups", AdapterConfig(prompt_length=2, layers=2))
    adapter.register_parameter("scale", nn.Parameter(torch.ones(3)))  # a 1-D parameter
    adapter.register_parameter("frozen", nn.Parameter(torch.ones(2, 2), requires_grad=False))
    try:
        decay, no_decay = loop.param_groups(adapter)
        assert [id(p) for p in decay] == [id(adapter.prompts)]
        assert {id(p) for p in no_decay} == {id(adapter.gates), id(adapter.scale)}
        assert adapter.gates.ndim == 2  # excluded by name, not by shape
        cfg = TrainConfig(weight_decay=0.3, lr=1e-3, beta1=0.8, beta2=0.9)
        opt = loop.build_optimizer(adapter, cfg)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
        assert [len(g["params"]) for g in opt.param_groups] == [1, 2]
        assert opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.8, 0.9)
    finally:
        base_model.remove_adapter("groups")


# ---- checkpoint.pt ---------------------------------------------------------------------------------------
def test_checkpoint_round_trip_restores_everything(
    run: loop.Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(checkpointing.KILL_ENV, raising=False)
    plan = epoch_plan([len(e.ids) for e in run.train_ex], 4, 2, 0, 0)
    loop.train_step(run, 0, plan[0])  # optimiser state is non-empty from here on
    run.metrics.append({"step": 1, "loss": 1.5})
    path = tmp_path / "ck.pt"
    torch.manual_seed(11)
    random.seed(12)
    checkpointing.save_checkpoint(
        path,
        step=1,
        n_train=len(run.train_ex),
        config=run.cfg.to_dict(),
        adapter=run.adapter,
        optimizer=run.opt,
        metrics=run.metrics,
    )
    after_save = (torch.rand(3), random.random())
    saved_adapter = {k: v.clone() for k, v in run.adapter.state_dict().items()}

    ckpt, p = checkpointing.load_checkpoint(str(tmp_path / "ck.pt"))
    assert p == path
    assert set(ckpt) == {"step", "n_train", "config", "adapter", "optimizer", "rng", "metrics"}
    assert "scheduler" not in ckpt

    with torch.no_grad():
        for t in run.adapter.parameters():
            t.add_(1.0)
    fresh_opt = loop.build_optimizer(run.adapter, run.cfg)
    torch.manual_seed(99)
    random.seed(98)
    start, metrics = checkpointing.restore_checkpoint(ckpt, run.adapter, fresh_opt, run.device, len(run.train_ex))
    assert start == 1 and metrics == [{"step": 1, "loss": 1.5}]
    x, y = torch.rand(3), random.random()  # the RNGs continue from where the checkpoint was written
    assert torch.equal(x, after_save[0]) and y == after_save[1]
    for k, v in run.adapter.state_dict().items():
        assert torch.equal(v, saved_adapter[k]), k
    a, b = fresh_opt.state_dict(), run.opt.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    with pytest.raises(TrainingError, match="8 training examples, the data now gives 9"):
        checkpointing.restore_checkpoint(ckpt, run.adapter, fresh_opt, run.device, 9)


def test_checkpoint_rng_state_is_restored() -> None:
    torch.manual_seed(5)
    random.seed(6)
    st = checkpointing.rng_state()
    expected = (torch.rand(4), random.random())
    torch.manual_seed(0)
    random.seed(0)
    checkpointing.set_rng_state(st)
    got = (torch.rand(4), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_checkpoint_errors_and_trajectory_check(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpointing.load_checkpoint(str(tmp_path))
    (tmp_path / checkpointing.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot read checkpoint"):
        checkpointing.load_checkpoint(str(tmp_path))
    ckpt = {"config": json.dumps(TrainConfig(seed=1, template="plain").to_dict())}
    checkpointing.check_trajectory(ckpt, TrainConfig(seed=1, template="plain", out="elsewhere"), tmp_path)
    with pytest.raises(TrainingError, match="seed=1 \\(now 2\\), template='plain' \\(now 'auto'\\)"):
        checkpointing.check_trajectory(ckpt, TrainConfig(seed=2), tmp_path)


# ---- one step and evaluation -----------------------------------------------------------------------------
def _direct_loss(run: loop.Run, examples: list, micro: list[list[int]]) -> float:
    with torch.no_grad():
        pad = run.model.tokenizer.pad_id
        parts = [batch_loss(run.model, run.name, collate([examples[i] for i in mb], pad)) for mb in micro]
    return sum(float(loss) for loss, _ in parts) / sum(n for _, n in parts)


def test_train_step_matches_direct_loss_and_learns(run: loop.Run) -> None:
    micro = epoch_plan([len(e.ids) for e in run.train_ex], 4, 2, 0, 0)[0]
    before = _direct_loss(run, run.train_ex, micro)
    prompts = run.adapter.prompts.detach().clone()
    m = loop.train_step(run, 0, micro)
    assert m["step"] == 1 and m["epoch"] == 0.5
    assert m["loss"] == pytest.approx(before, rel=1e-5)
    assert m["lr"] == pytest.approx(run.cfg.effective_lr * lr_factor(0, run.spe, 2, 1))
    assert m["grad_norm"] > 0 and m["tokens_per_s"] > 0
    assert not torch.equal(run.adapter.prompts, prompts)  # the optimiser stepped
    assert all(p.grad is None for p in run.params)  # and cleared the gradients
    for step in range(1, 4):
        loop.train_step(run, step, micro)
    assert _direct_loss(run, run.train_ex, micro) < before


def test_train_step_stops_on_non_finite_loss(run: loop.Run, monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_loss(*a: object, **k: object) -> tuple[torch.Tensor, int]:
        loss, n = batch_loss(*a, **k)  # type: ignore[arg-type]
        return loss * float("nan"), n

    monkeypatch.setattr(loop, "batch_loss", nan_loss)
    prompts = run.adapter.prompts.detach().clone()
    with pytest.raises(TrainingError, match="non-finite loss.*step 1.*no checkpoint was written"):
        loop.train_step(run, 0, [[0, 1], [2, 3]])
    assert torch.equal(run.adapter.prompts, prompts)


def test_evaluate_is_the_token_mean_over_validation(run: loop.Run) -> None:
    got = loop.evaluate(run)
    micro = [[i] for i in range(len(run.val_ex))]
    assert got is not None and got == pytest.approx(_direct_loss(run, run.val_ex, micro), rel=1e-5)
    run.val_ex = []
    assert loop.evaluate(run) is None


def test_write_run_files(run: loop.Run) -> None:
    run.metrics.append({"step": 1, "loss": 2.0})
    loop.write_run_files(run)
    info = json.loads((run.out / "run_info.json").read_text())
    assert info["n_train"] == 8 and info["n_val"] == 4 and info["steps_per_epoch"] == 2
    assert info["total_steps"] == info["run_steps"] == 4 and info["world_size"] == 1
    assert info["n_trainable"] == sum(p.numel() for p in run.params) and info["layers"] == run.layers
    assert (run.out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    import yaml

    assert yaml.safe_load((run.out / "config.yaml").read_text())["resume"] is None


# ---- data, adapter, schedule, config ---------------------------------------------------------------------
def test_load_data_val_split_and_errors(tmp_path: Path) -> None:
    log: list[str] = []
    cfg = small_cfg(tmp_path, Path("x"), val_fraction=0.25)
    recs, vrecs, skipped = loop.load_data(cfg, make_records(8), None, log.append)
    assert (len(recs), len(vrecs), skipped) == (6, 2, 0) and log == []
    bad = [*make_records(3), {"instruction": "x", "output": 7}]
    recs, vrecs, skipped = loop.load_data(small_cfg(tmp_path, Path("x"), skip_invalid=True), bad, None, log.append)
    assert (len(recs), vrecs, skipped) == (3, [], 1) and "skipped 1 invalid record" in log[0]
    with pytest.raises(TrainingError, match="either --val-data or --val-fraction"):
        loop.load_data(cfg, make_records(8), make_records(2), log.append)
    with pytest.raises(TrainingError, match="no training data"):
        loop.load_data(cfg, None, None, log.append)
    with pytest.raises(TrainingError, match="records: the training set is empty"):
        loop.load_data(small_cfg(tmp_path, Path("x")), [], None, log.append)


def test_build_adapter_is_seeded(tmp_path: Path, base_model: la.Transformer) -> None:
    cfg = small_cfg(tmp_path, Path("x"), attention="rand-init", layers=2, prompt_length=3, seed=4)
    dev = torch.device("cpu")
    a, recs, vrecs = loop.build_adapter(cfg, base_model, make_records(2), [], dev, distributed.Topology())
    first = a.prompts.detach().clone()
    assert a.cfg.layers == 2 and a.cfg.init == "random" and len(recs) == 2 and vrecs == []
    b, _, _ = loop.build_adapter(cfg, base_model, make_records(2), [], dev, distributed.Topology())
    assert base_model.adapters["default"] is b and torch.equal(b.prompts, first)
    with pytest.raises(TrainingError, match="--layers 9: the base has 4 layers"):
        loop.adapter_config(small_cfg(tmp_path, Path("x"), layers=9), 4)


def test_schedule_step_counts() -> None:
    assert step_counts(20, 8, 2, None) == (3, 6, 6)
    assert step_counts(20, 8, 2, 4) == (3, 6, 4)
    assert step_counts(3, 8, 0.1, None) == (1, 1, 1)
    assert lr_factor(0, 3, 2, 0) == pytest.approx(1.0) and lr_factor(5, 3, 2, 0) < lr_factor(4, 3, 2, 0)


def test_config_errors_are_user_errors() -> None:
    with pytest.raises(TrainingError, match="--prompt-length must be >= 1"):
        TrainConfig(prompt_length=0).validate()
    with pytest.raises(TrainingError, match="unknown option.*nope"):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(TemplateError, match="unknown template 'missing'"):
        load_template("missing")
    assert issubclass(TemplateError, UserError) and issubclass(TemplateError, ValueError)


def test_a_bad_number_for_an_optional_option_names_the_type(capsys: pytest.CaptureFixture[str]) -> None:
    """`--max-steps abc` (an `int | None` option) says which kind of value it wanted, not argparse's `<lambda>`."""
    for flag in ("--max-steps", "--loss-chunk"):
        with pytest.raises(SystemExit):
            cli_main(["finetune", "--base", "builtin", "--data", "x.json", flag, "abc"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.endswith(f"argument {flag}: invalid int value: 'abc'"), err


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--base", "builtin", "hi"],
        ["serve", "--base", "builtin"],
        ["demo"],
        ["pretrain"],
        ["encoder", "eval", "--model", "m", "--adapter", "a", "--data", "d"],
        ["eval", "scienceqa", "--base", "builtin", "--data", "d"],
        ["eval", "open-qa", "--base", "builtin", "--data", "d"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_threads_below_one_is_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--threads 0 / -1 / abc: argparse's one-line usage error, before anything loads (torch.set_num_threads would
    raise a RuntimeError traceback for -1, and 0 silently meant torch's default)."""
    for value, says in (("-1", "-1: must be >= 1"), ("0", "0: must be >= 1"), ("abc", "'abc' is not a whole number")):
        with pytest.raises(SystemExit) as e:
            cli_main([*argv, "--threads", value])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and err.endswith(f"argument --threads: {says}"), err


def test_template_file_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TemplateError, match="broken.json: not a valid template file"):
        load_template(str(tmp_path / "broken.json"))
    (tmp_path / "partial.json").write_text('{"with_input": "{instruction}"}')
    with pytest.raises(TemplateError, match="lacks 'without_input'"):
        load_template(str(tmp_path / "partial.json"))


def test_cli_keeps_the_traceback_of_a_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(cfg: TrainConfig) -> None:
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(loop, "train", buggy)
    with pytest.raises(ValueError, match="a bug"):
        cli_main(["finetune", "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "o"), "--no-progress"])


# ---- distributed, one process ----------------------------------------------------------------------------
def test_topology_and_single_process_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(k, v)
    assert distributed.topology() == distributed.Topology(3, 4, 1) and not distributed.topology().main
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    one = distributed.topology()
    assert one == distributed.Topology() and one.main
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(3))
    a.grad = torch.full((2, 2), 2.0)
    flat, stats = distributed.reduce_gradients([a, b], torch.tensor(1.5), 7, one)
    assert torch.equal(flat, torch.tensor([2.0] * 4 + [0.0] * 3))
    assert torch.equal(b.grad, torch.zeros(3)) and stats.tolist() == [1.5, 7.0]  # type: ignore[arg-type]
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t, torch.device("cpu"), one) is t
