"""The training core on a toy recipe (a linear regression over finite data): epochs and
gradient accumulation, the epoch hook, stop/resume bit for bit, the non-finite-loss stop, the
log kept once per step across a resume."""

import dataclasses
import json
import os

import pytest
import torch

from unigen.training import Recipe, StepOutput, Trainer
from unigen.training import checkpointing as ckpt
from unigen.training.config import (
    CheckpointConfig,
    DistributedConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
)
from unigen.training.distributed import DistEnv


class _Config:
    def save(self, path):
        with open(path, "w") as f:
            f.write("{}\n")


class Line(torch.nn.Module):
    """What the core needs of a model: parameters, a ``config`` to save, tokenizers (none)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(3, 1)
        self.config, self.text_tokenizer, self.decoder_tokenizer = _Config(), None, None


class LineRecipe(Recipe):
    """Regression on 9 points, 2 per micro-batch (5 micro-batches per epoch, the last of 1),
    reshuffled per epoch from the epoch number alone."""

    name = "toy"

    def __init__(self, lr_scale=1.0):
        self.x = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]]) * lr_scale
        self.calls, self.epochs_ended = [], []

    def build_model(self):
        return Line()

    def micro_batches_per_epoch(self):
        return 5

    def batches(self, epoch, done):
        self.calls.append((epoch, done))

        def gen(epoch, done):
            while True:
                order = torch.randperm(9, generator=torch.Generator().manual_seed(epoch))
                for i in range(done, 5):
                    yield order[2 * i:2 * i + 2]
                epoch, done = epoch + 1, 0

        return gen(epoch, done)

    def forward(self, model, rows, generator, validate):
        loss = ((model.w(self.x[rows]) - self.y[rows]) ** 2).mean()
        return StepOutput(loss, len(rows))

    def end_of_epoch(self, trainer, epoch):
        self.epochs_ended.append((epoch, trainer.step))
        return {"dev": {"epoch": epoch}}


def config(out, **sections):
    parts = dict(optim=OptimConfig(lr=0.1, grad_accum_steps=2, grad_clip=0.0),
                 schedule=ScheduleConfig(steps=0, epochs=3, warmup_steps=0, decay="linear"),
                 run=RunConfig(output_dir=str(out), device="cpu", precision="fp32"),
                 checkpoint=CheckpointConfig(every=0, keep_last=0),
                 logging=LoggingConfig(every=1, console=False, tensorboard=False,
                                       progress_bar=False),
                 distributed=DistributedConfig())
    parts.update(sections)
    # a recipe's config: a dataclass holding the core's sections
    cls = dataclasses.make_dataclass("ToyConfig", [(k, type(v)) for k, v in parts.items()],
                                     kw_only=True)
    return cls(**parts)


def fit(recipe, cfg, log=None):
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    return Trainer(recipe, cfg, env, log=log).fit()


def test_epochs_accumulation_and_the_epoch_hook(tmp_path):
    recipe = LineRecipe()
    result = fit(recipe, config(tmp_path / "run"))
    # 5 micro-batches per epoch, 2 per step: steps of 2, 2 and 1 micro-batches
    assert result.step == 9 and result.history["step"] == list(range(1, 10))
    assert recipe.epochs_ended == [(1, 3), (2, 6), (3, 9)]
    assert recipe.calls == [(1, 0)]
    assert result.history["lr"] == pytest.approx([0.1 * (1 - (s + 1) / 9) for s in range(9)])
    assert result.history["loss"][-1] < 0.2 * result.history["loss"][0]
    # a checkpoint after every epoch; the hook's report in the log with its step
    assert [s for s, _ in ckpt.list_checkpoints(ckpt.checkpoint_root(result.run_dir))] == [3, 6, 9]
    lines = [json.loads(x) for x in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    assert [(x["step"], x["dev"]["epoch"]) for x in lines if "dev" in x] == [(3, 1), (6, 2), (9, 3)]
    assert [x["epoch"] for x in lines if "dev" not in x] == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_the_mean_of_the_micro_batches_is_what_steps(tmp_path):
    """One step of 2 micro-batches moves the weights as one batch of both would (equal sizes:
    the mean of the two means is the mean)."""
    two = LineRecipe()
    r = fit(two, config(tmp_path / "two", schedule=ScheduleConfig(steps=1, warmup_steps=0)))

    class OneBatch(LineRecipe):
        def batches(self, epoch, done):
            order = torch.randperm(9, generator=torch.Generator().manual_seed(1))
            return iter([order[:4]])

    one = fit(OneBatch(), config(tmp_path / "one", optim=OptimConfig(lr=0.1, grad_clip=0.0),
                                 schedule=ScheduleConfig(steps=1, warmup_steps=0)))
    for a, b in zip(r.model.parameters(), one.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_stop_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    whole = fit(LineRecipe(), config(tmp_path / "whole"))
    out = tmp_path / "stopped"
    lines = []
    first = fit(LineRecipe(), config(out, run=RunConfig(output_dir=str(out), device="cpu",
                                                        precision="fp32", stop_at_step=4),
                                     logging=LoggingConfig(every=1, tensorboard=False,
                                                           progress_bar=False)),
                log=lines.append)
    assert first.step == 4 and first.final_model_dir is None
    assert "[toy] stopped at step 4 (run.stop_at_step); the next launch resumes from it" in lines
    assert "[toy] final model: not written, the run is not complete (the next launch resumes " \
           f"from it; newest checkpoint {first.last_checkpoint})" in lines
    # a crash after step 4 left a log line of step 5 behind: the resumed run redoes step 5
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss/total": 123.0}) + "\n")
    resumed_recipe = LineRecipe()
    resumed = fit(resumed_recipe, config(out))
    assert resumed_recipe.calls == [(2, 2)]  # epoch 2, one step (2 micro-batches) done
    assert resumed.resumed_from.endswith("step_00000004")
    assert resumed.history == whole.history
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)
    logged = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in logged if "dev" not in x] == list(range(1, 10))


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"toy: the loss is (nan|inf) at step \d+; try a "
                                                 r"lower --optim.lr"):
        fit(LineRecipe(lr_scale=1e30), config(tmp_path / "nan",
                                              optim=OptimConfig(lr=1e30, grad_clip=0.0)))
    # no checkpoint of the diverged model
    saved = ckpt.list_checkpoints(ckpt.checkpoint_root(str(tmp_path / "nan")))
    assert all(s < 3 for s, _ in saved)


def test_epochs_need_finite_data(tmp_path):
    class Endless(LineRecipe):
        def micro_batches_per_epoch(self):
            return None

    with pytest.raises(ValueError, match="schedule.epochs: toy's data is endless"):
        fit(Endless(), config(tmp_path / "endless"))


class BadData(ValueError):
    """Stands for a recipe's data error (a malformed line met mid-run)."""


class BreaksAt(LineRecipe):
    """The loader raises at micro-batch ``at`` (0-based, over the run)."""

    data_errors = (BadData,)

    def __init__(self, at):
        super().__init__()
        self.at = at

    def batches(self, epoch, done):
        inner = super().batches(epoch, done)

        def gen():
            for i, rows in enumerate(inner):
                if i == self.at:
                    raise BadData("data.jsonl:7: not valid JSON")
                yield rows

        return gen()


def test_a_data_error_mid_run_checkpoints_the_steps_done_first(tmp_path):
    lines = []
    cfg = config(tmp_path / "run", logging=LoggingConfig(every=1, tensorboard=False,
                                                         progress_bar=False))
    with pytest.raises(BadData, match="data.jsonl:7"):
        fit(BreaksAt(3), cfg, log=lines.append)  # step 2's second micro-batch
    saved = ckpt.list_checkpoints(ckpt.checkpoint_root(str(tmp_path / "run")))
    assert [s for s, _ in saved] == [1]
    assert any(line.startswith("[toy] data error at step 2: the 1 steps done are saved in")
               for line in lines)
    # the checkpoint continues the run: resumed with the data fixed, it equals the whole run
    whole = fit(LineRecipe(), config(tmp_path / "whole"))
    resumed = fit(LineRecipe(), config(tmp_path / "run"))
    assert resumed.resumed_from.endswith("step_00000001") and resumed.history == whole.history


def test_an_error_before_the_first_step_leaves_no_run_folder(tmp_path):
    with pytest.raises(BadData):
        fit(BreaksAt(0), config(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    # a folder that was there before is not removed
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(BadData):
        fit(BreaksAt(0), config(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """Written to a file, the bar's carriage returns tear the step lines apart."""
    fit(LineRecipe(), config(tmp_path / "run", logging=LoggingConfig(
        every=1, tensorboard=False, progress_bar=True, console=True)))
    out = capsys.readouterr()
    assert "\r" not in out.err + out.out and "step 9" in out.out
