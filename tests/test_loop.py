"""The shared training loop with a toy step that counts calls: cadences, stop signals, resume."""

import math
import signal

import pytest

from nanochat_jax import loop as L


class Bar:
    disable = True

    def close(self):
        pass


class Ckpt:
    """Records saves; every save is on disk at once."""

    def __init__(self):
        self.saved = []

    def wait(self, timeout=None):
        return True

    def latest_step(self):
        return self.saved[-1] if self.saved else None


class Stop:
    """Reports a SIGTERM from the `at`-th question on, as StopSignals would after a signal."""
    name, exit_code = "SIGTERM", 128 + signal.SIGTERM

    def __init__(self, at):
        self.at, self.asked = at, 0

    def requested(self):
        self.asked += 1
        return self.asked > self.at


def toy(start=0, num_steps=7, loop=None, calls=None, **kw):
    calls = {} if calls is None else calls
    calls.update(train=[], eval=[], save=[], lines=[])
    ckpt = Ckpt()

    def save(step):
        calls["save"].append(step)
        ckpt.saved.append(step)

    def show(info, metrics):
        return f"step {info.step} loss {info.loss:.4f}", "", {"train/loss": info.loss}

    state = {} if loop is None else loop
    kw.setdefault("out_dir", None)
    out = L.run(start, done=lambda s: s == num_steps, train=lambda s: calls["train"].append(s) or {"loss": float(s)},
                show=show, loop=state, bar=Bar(), say=calls["lines"].append,
                evaluate=lambda s, last: calls["eval"].append((s, last)), save=save, ckpt=ckpt, **kw)
    return out, calls, state


def test_cadences_fire_at_their_steps():
    (step, loss), calls, state = toy(save_every=3)
    assert step == 7 and calls["train"] == list(range(7))
    assert calls["eval"] == [(s, s == 7) for s in range(8)]
    assert calls["save"] == [3, 6, 7]  # the cadence, then the end
    assert len(calls["lines"]) == 7 and calls["lines"][0] == "step 0 loss 0.0000"
    ema = 0.0
    for x in range(7):
        ema = 0.9 * ema + 0.1 * x
    assert loss == pytest.approx(ema / (1 - 0.9 ** 7)) and state["ema_n"] == 7


def test_a_stop_saves_once_and_exits(tmp_path, capsys):
    calls = {}
    with pytest.raises(SystemExit) as e:
        toy(save_every=2, stop=Stop(at=3), out_dir=tmp_path, calls=calls)
    assert e.value.code == 143
    assert calls["train"] == [0, 1, 2] and calls["save"] == [2, 3]  # the cadence's step 2, then step 3 once
    assert capsys.readouterr().err.strip() == (f"stopped by SIGTERM at step 3; checkpoint step 3 is in "
                                               f"{tmp_path / 'checkpoints'}; continue with --resume")


def test_a_stop_at_the_step_on_disk_does_not_save_it_again(tmp_path):
    calls = {}
    with pytest.raises(SystemExit):
        toy(start=4, on_disk=4, stop=Stop(at=0), out_dir=tmp_path, calls=calls)
    assert calls["train"] == [] and calls["save"] == []


def test_resume_continues_at_its_step_without_saving_it_again():
    loop = {"ema_smooth": 0.5, "ema_n": 5, "total_training_time": 10.0}
    (step, _), calls, state = toy(start=4, num_steps=7, loop=loop, save_every=2, on_disk=4, timing_skip=1)
    assert calls["train"] == [4, 5, 6] and step == 7
    assert calls["save"] == [6, 7]  # step 4 is on disk already
    assert state["ema_n"] == 8 and state["total_training_time"] > 10.0
    (step, _), calls, _ = toy(start=7, num_steps=7, on_disk=7)  # resumed at the end: nothing left to do
    assert step == 7 and calls["train"] == [] and calls["save"] == [] and calls["eval"] == [(7, True)]


def test_a_stage_without_loss_has_no_ema():
    step, loss = L.run(0, done=lambda s: s == 2, train=lambda s: {"reward": 1.0}, show=lambda i, m: ("x", "", {}),
                       loop={}, bar=Bar(), say=lambda *a: None)
    assert step == 2 and math.isnan(loss)


def test_a_failed_step_closes_the_logger_and_keeps_what_it_logged(tmp_path):
    """A step that raises still leaves metrics.jsonl complete and the TensorBoard writer closed
    (an open one would be flushed by its own exit hook, which fails at interpreter shutdown)."""
    from nanochat_jax.report import RunLogger, read_metrics

    logger = RunLogger(tmp_path)

    def train(step):
        if step == 2:
            raise RuntimeError("device lost")
        return {"loss": 1.0}

    show = lambda info, m: ("", "", {"train/loss": m["loss"]})  # noqa: E731
    with pytest.raises(RuntimeError, match="device lost"):
        L.run(0, done=lambda s: s == 5, train=train, show=show, loop={}, bar=Bar(), say=lambda s: None,
              logger=logger)
    assert logger._file is None and logger._tb is None
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]
