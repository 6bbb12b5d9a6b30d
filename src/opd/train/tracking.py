"""Where metrics go: RUN_DIR/metrics.jsonl (one JSON object per step), TensorBoard, optionally W&B.

Only the main process writes. On resume the JSONL is cut back to the checkpoint's step so a run that
was killed after logging steps it then re-does never shows a step twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opd.errors import OpdError
from opd.files import atomic_write_text, json_safe, jsonl_lines


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "opd",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = []
            for _, line in jsonl_lines(self.path.read_text(encoding="utf-8")):
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill: everything after it is gone too
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a")  # noqa: SIM115 - held for the whole run, closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=(resume_step or 0) + 1)
            except ImportError:
                self._tb = None
        if wandb:
            try:
                import wandb as wb
            except ImportError as exc:
                raise RuntimeError(
                    "tracking.wandb is true but wandb is not installed: pip install wandb"
                ) from exc
            self._wandb = wb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # A non-finite value is written as null, the key kept (JSON has no NaN; strict parsers reject
        # Python's spelling): null is NaN and +/-inf alike, which `opd.analysis.analyze.load_run` reads back
        # as NaN. Runs written before wrote the string "nan"/"inf"; every reader accepts both.
        row = json_safe({"step": step, **metrics})
        try:
            self._fh.write(json.dumps(row, allow_nan=False) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except (
            OSError
        ) as exc:  # a full disk: one line, not a traceback; a torn last line is dropped on resume
            import shutil

            from opd.errors import StorageError

            free = shutil.disk_usage(self.path.parent).free / 1e6
            raise StorageError(
                f"could not append to {self.path}: {exc.strerror or exc} [{exc.errno}]; {free:.1f} MB free there; "
                f"checkpoints are untouched: free space, then resume the run (`--resume {self.path.parent}`)"
            ) from exc
        if metrics.get("kind") == "alarm":  # dashboards get one series per alarming signal, not "value"
            scalars = {f"alarm/{metrics.get('signal', 'unknown')}": metrics.get("value")}
            scalars = {k: v for k, v in scalars.items() if isinstance(v, (int, float))}
        else:
            scalars = {
                k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.jsonl as written; a torn last line (a run killed mid-write) is skipped.

    A non-finite value is null (runs from before: the string "nan" or "inf"); callers that take only
    numbers (the lab's statistics) skip both, `opd.analysis.analyze.metric_value` reads either as a float.
    """
    path = Path(run_dir) / "metrics.jsonl"
    lines = [line for _, line in jsonl_lines(path.read_text(encoding="utf-8")) if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise OpdError(f"{path}:{i + 1}: not a JSON object; the metrics file is damaged") from None
    return rows


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 1 << 62))
    except (json.JSONDecodeError, AttributeError):
        return 1 << 62


def write_run_files(run_dir: Path, config_yaml: str, adjustments: list[dict[str, Any]],
                    resume_step: int | None, *, device: dict[str, Any] | None = None) -> None:  # fmt: skip
    """The run directory's own files at (re)start: config.yaml, adjustments.json (settings used other than
    asked, when any), device.json (`device`: what this start chose for speed on its device, TF32, fused
    AdamW, the CUDA allocator, the collective timeout: `opd.train.loop.device_choices`; rewritten at every
    start, since a resume may run on other hardware) and samples.jsonl cut back to `resume_step` (a resumed
    run redoes the steps after it; a new run starts it empty). Main process only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_yaml)
    if device is not None:
        text = json.dumps(json_safe(device), indent=1, allow_nan=False) + "\n"
        atomic_write_text(run_dir / "device.json", text)
    if adjustments:
        text = json.dumps(json_safe({"adjustments": adjustments}), indent=1, allow_nan=False) + "\n"
        atomic_write_text(run_dir / "adjustments.json", text)
    samples = run_dir / "samples.jsonl"
    if samples.exists():
        keep = [ln for _, ln in jsonl_lines(samples.read_text(encoding="utf-8"))
                if resume_step is not None and _step_of(ln) <= resume_step]  # fmt: skip
        atomic_write_text(samples, "".join(k + "\n" for k in keep))
