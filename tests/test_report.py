"""Peak-FLOPs table, MFU, loss EMA, metrics.jsonl/TensorBoard logging, report.md with plots, the step line."""

import importlib.util
import json
import math
import struct
import sys

import jax
import numpy as np
import pytest

from nanochat_jax.common import PEAK_FLOPS, mfu, peak_flops
from nanochat_jax.report import LossEMA, RunLogger, format_step_line, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_TBX = importlib.util.find_spec("tensorboardX") is not None


def tb_scalars(event_file) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a TensorBoard event file."""
    from tensorboardX.proto.event_pb2 import Event

    data, out = event_file.read_bytes(), []
    while data:  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
        (n,) = struct.unpack("<Q", data[:8])
        ev = Event.FromString(data[12:12 + n])
        out += [(ev.step, v.tag, v.simple_value) for v in ev.summary.value]
        data = data[16 + n:]
    return out


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA B200", 2.25e15),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
    ("cpu", None),
    ("TPU v4 lite", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_flops_matches_device_kind(kind, peak):
    assert peak_flops(kind) == peak


def test_peak_flops_table_and_cpu_device():
    assert PEAK_FLOPS["NVIDIA H100 SXM"] == 989e12 and PEAK_FLOPS["TPU v5e"] == 197e12
    assert peak_flops(jax.devices("cpu")[0]) is None
    if jax.default_backend() == "cpu":
        assert peak_flops() is None


def test_mfu_arithmetic():
    # upstream's leaderboard run 1: 4.33e19 FLOPs in 10949 s on 8 H100s ≈ 50%
    n_steps, tokens = 1000, 2 ** 19
    per_token = 4.33e19 / (n_steps * tokens)
    assert mfu(per_token, tokens, 10949 / n_steps, 8, 989e12) == pytest.approx(49.98, abs=0.01)
    assert mfu(1e9, 1e6, 1.0, 1, 1e15) == pytest.approx(100.0)
    assert mfu(1e9, 1e6, 2.0, 4, 1e15) == pytest.approx(12.5)
    assert mfu(1e9, 1e6, 1.0, 1, None) is None
    assert mfu(1e9, 1e6, 0.0, 1, 1e15) is None


def test_loss_ema_debias():
    ema = LossEMA()
    assert math.isnan(ema.value)
    assert ema.update(5.0) == pytest.approx(5.0)  # (0.1·5) / (1 − 0.9)
    assert ema.update(3.0) == pytest.approx((0.9 * 0.5 + 0.1 * 3.0) / (1 - 0.81))
    losses = [5.0, 3.0, 4.0, 2.0]
    ema, smooth = LossEMA(), 0.0
    for n, x in enumerate(losses, 1):
        smooth = 0.9 * smooth + 0.1 * x
        assert ema.update(x) == pytest.approx(smooth / (1 - 0.9 ** n))
    resumed = LossEMA(smooth=ema.smooth, n=ema.n)  # restored from a checkpoint
    assert resumed.update(1.0) == pytest.approx(LossEMA(smooth=ema.smooth, n=ema.n).update(1.0))
    const = LossEMA()
    assert all(const.update(2.5) == pytest.approx(2.5) for _ in range(20))  # debias: no warm-up bias


def test_run_logger_writes_jsonl_and_tensorboard(tmp_path):
    with RunLogger(tmp_path / "run") as log:
        log.log(0, **{"train/loss": np.float32(4.5), "train/mfu": None})
        # flushed per call: readable while the run is still going
        assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [{"step": 0, "train/loss": 4.5, "train/mfu": None}]
        log.log(10, **{"train/loss": jax.numpy.float32(3.25), "val/bpb": 1.5, "train/tok_per_sec": 1234})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": 0, "train/loss": 4.5, "train/mfu": None},
        {"step": 10, "train/loss": 3.25, "val/bpb": 1.5, "train/tok_per_sec": 1234},
    ]
    with RunLogger(tmp_path / "run") as log:  # a resumed run appends (and, same second, keeps the old events)
        log.log(20, **{"train/loss": 3.0})
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 10, 20]
    if HAS_TBX:
        events = sorted((tmp_path / "run" / "tb").glob("events.out.tfevents.*"), key=lambda e: -e.stat().st_size)
        assert [len(tb_scalars(e)) for e in events] == [4, 1]


@pytest.mark.skipif(not HAS_TBX, reason="tensorboardX not installed")
def test_tensorboard_holds_the_scalars(tmp_path):
    with RunLogger(tmp_path) as log:
        log.log(7, **{"val/bpb": 1.25, "train/mfu": None, "train/tok_per_sec": np.int64(1000)})
    (event,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert tb_scalars(event) == [(7, "val/bpb", 1.25), (7, "train/tok_per_sec", 1000.0)]


def test_without_tensorboardx_logs_jsonl_and_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the import raise ImportError
    with pytest.warns(UserWarning, match="tensorboardX is not installed"):
        log = RunLogger(tmp_path)
    log.log(1, **{"train/loss": 2.0})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "train/loss": 2.0}]
    assert not (tmp_path / "tb").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(tmp_path / "off", enabled=False)
    log.log(0, loss=1.0)
    log.close()
    assert not (tmp_path / "off").exists()


def test_write_report_with_plots(tmp_path):
    with RunLogger(tmp_path) as log:
        for step in range(0, 60, 5):
            log.log(step, **{"train/loss": 5.0 - 0.05 * step, "train/lrm": 1.0})
            if step % 20 == 0:
                log.log(step, **{"val/bpb": 2.0 - 0.01 * step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 60, "train/lo')  # a torn last line from a killed run is skipped
    report = write_report(tmp_path, "d4 smoke run", {"Model": {"depth": 4, "params": 1234567}, "Notes": "all good"},
                          tmp_path / "metrics.jsonl")
    text = report.read_text()
    assert report == tmp_path / "report.md"
    assert text.startswith("# d4 smoke run")
    assert "| train/loss | 2.25 | 55 | 2.25 |" in text
    assert "| val/bpb | 1.6 | 40 | 1.6 |" in text
    assert "| depth | 4 |" in text and "| params | 1,234,567 |" in text and "all good" in text
    assert "](loss.png)" in text and "](val_bpb.png)" in text
    for name in ("loss.png", "val_bpb.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 1000
    assert not list(tmp_path.glob(".*tmp*"))  # temp files renamed away


def test_write_report_without_metrics(tmp_path):
    write_report(tmp_path, "empty", {}, tmp_path / "metrics.jsonl")
    assert "(no metrics logged)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "val_bpb.png").read_bytes()[:8] == PNG_MAGIC


def test_step_line_format():
    line = format_step_line(250, 1000, 3.1234567, 0.95, 0.4567, 524288, mfu=41.234, total_time=123.0, eta=345.0,
                            epoch=1)
    assert line == ("step 00250/01000 (25.00%) | loss: 3.123457 | lrm: 0.95 | dt: 456.70ms | tok/sec: 1,147,992 "
                    "| bf16_mfu: 41.23 | epoch: 1 | total time: 2.05m | eta: 5.8m")
    cpu = format_step_line(0, 10, 4.0, 1.0, 0.5, 1024)
    assert cpu == "step 00000/00010 (0.00%) | loss: 4.000000 | lrm: 1.00 | dt: 500.00ms | tok/sec: 2,048 | total time: 0.00m"
    assert "mfu" not in cpu
