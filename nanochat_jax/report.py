"""Run logging and the end-of-run report: metrics.jsonl, TensorBoard, report.md with plots.

nanochat prints one line per step and sends scalars to wandb. We print the same line,
append every logged scalar to metrics.jsonl (the record of the run, readable without any
viewer) and mirror it to TensorBoard when tensorboardX is installed. write_report turns
metrics.jsonl into report.md with a loss and a val-bpb plot.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import uuid
import warnings
from pathlib import Path

from nanochat_jax.fileio import atomic_write

METRICS_NAME = "metrics.jsonl"
TRAIN_LOSS = "train/loss"  # the debiased EMA loss, as nanochat logs it
VAL_BPB = "val/bpb"


def _plain(value):
    """jax/numpy scalars → Python numbers, so json and TensorBoard take them."""
    return value.item() if hasattr(value, "item") else value


class RunLogger:
    """log(step, **scalars) → one JSON line in run_dir/metrics.jsonl (+ TensorBoard in run_dir/tb).

    Lines are flushed as written, so a crashed run keeps everything logged. A resumed run
    appends. enabled=False (every process but the main one) makes it a no-op. None values
    (e.g. MFU on an unknown device) go to JSON as null and are left out of TensorBoard.
    """

    def __init__(self, run_dir, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_NAME
        self.enabled = enabled
        self._file = self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            warnings.warn("tensorboardX is not installed: metrics go to metrics.jsonl only", stacklevel=2)
        else:
            # tensorboardX names the file by second + host and opens it "wb": a unique suffix
            # keeps a logger reopened within the same second from truncating the last one's
            self._tb = SummaryWriter(str(self.run_dir / "tb"), filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def log(self, step: int, **scalars) -> None:
        if self._file is None:
            return
        values = {k: _plain(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        self._file = self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclasses.dataclass
class LossEMA:
    """nanochat's smoothed train loss: EMA with β = 0.9, debiased by 1/(1 − β^n) after n updates.

    Without the debias the curve would start near 0 (the EMA starts at 0); with it the first
    value is the first loss. Save (smooth, n) in the checkpoint to resume the same curve.
    """

    beta: float = 0.9
    smooth: float = 0.0
    n: int = 0

    def update(self, loss) -> float:
        self.smooth = self.beta * self.smooth + (1 - self.beta) * float(loss)
        self.n += 1
        return self.value

    @property
    def value(self) -> float:
        return self.smooth / (1 - self.beta ** self.n) if self.n else math.nan


class StepTimer:
    """ETA = mean of the last `window` step times x steps left. The caller leaves out steps that
    compile (the first after a start or resume), which would inflate it."""

    def __init__(self, window: int = 50):
        self.durations = collections.deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.durations.append(float(seconds))

    def eta(self, steps_left: int) -> float | None:
        """Seconds to go, or None before any timed step."""
        if not self.durations:
            return None
        return max(0, steps_left) * sum(self.durations) / len(self.durations)


def format_step_line(step: int, num_steps: int, loss: float, lrm: float, dt: float, tokens_per_step: int,
                     mfu: float | None = None, total_time: float = 0.0, eta: float | None = None,
                     epoch=None) -> str:
    """nanochat's per-step print: dt, total_time and eta in seconds; MFU (percent) only when known."""
    parts = [
        f"step {step:05d}/{num_steps:05d} ({100 * step / max(num_steps, 1):.2f}%)",
        f"loss: {loss:.6f}",
        f"lrm: {lrm:.2f}",
        f"dt: {dt * 1000:.2f}ms",
        f"tok/sec: {int(tokens_per_step / dt) if dt > 0 else 0:,}",
    ]
    if mfu is not None:
        parts.append(f"bf16_mfu: {mfu:.2f}")
    if epoch is not None:
        parts.append(f"epoch: {epoch}")
    parts.append(f"total time: {total_time / 60:.2f}m")
    if eta is not None:
        parts.append(f"eta: {eta / 60:.1f}m")
    return " | ".join(parts)


# ---- report -----------------------------------------------------------------------------

def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl (none if it is missing); a torn line (a run killed mid-write) is skipped."""
    records = []
    if not Path(path).exists():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) sorted by step; a step logged twice (re-run after a resume) keeps its last value."""
    by_step = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
    return sorted(by_step.items())


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v).replace("|", "\\|")  # a bare | would end the table cell
    return f"{v:,}" if isinstance(v, int) else f"{v:.6g}"


def _table(header: tuple[str, ...], rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def _plot(points: list[tuple[int, float]], path: Path, ylabel: str, title: str) -> None:
    """A PNG line plot via the Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) <= 50 else None, markersize=3)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def write_report(run_dir, title: str, sections: dict, metrics_path=None) -> Path:
    """Write run_dir/report.md (+ loss.png, val_bpb.png) and return its path.

    The summary table has, for every numeric metric, its last value, that step and its
    minimum. `sections` maps a heading to a dict (rendered as a key/value table) or to
    markdown text. Every file is replaced atomically, so a reader never sees half of one.
    """
    run_dir = Path(run_dir)
    records = read_metrics(metrics_path or run_dir / METRICS_NAME)
    keys = sorted({k for r in records for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    summary = []
    for key in keys:
        series = _series(records, key)
        summary.append((key, series[-1][1], series[-1][0], min(v for _, v in series)))

    _plot(_series(records, TRAIN_LOSS), run_dir / "loss.png", "loss (EMA, nats)", "train loss")
    _plot(_series(records, VAL_BPB), run_dir / "val_bpb.png", "bits per byte", "validation bpb")

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"# {title}", "", f"Generated {now}.", "", "## Summary", ""]
    lines += _table(("metric", "last", "at step", "min"), summary) if summary else ["(no metrics logged)"]
    lines += ["", "## Curves", "", "![train loss](loss.png)", "", "![validation bpb](val_bpb.png)", ""]
    for heading, body in sections.items():
        lines += [f"## {heading}", ""]
        lines += _table(("key", "value"), body.items()) if isinstance(body, dict) else [str(body)]
        lines.append("")
    report = run_dir / "report.md"
    atomic_write(report, lambda f: f.write("\n".join(lines).encode("utf-8")))
    return report
