"""A terminal progress bar for training: step, loss, seconds per step and the latest validation."""

from __future__ import annotations

import sys


class ConsoleProgress:
    """tqdm (a ComfyUI dependency) when importable, else one plain line per 5 % of the run, on stderr."""

    def __init__(self, total: int, initial: int = 0, desc: str = "Sparse Context LoRA"):
        self.total = total
        self.step = initial
        self.desc = desc
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, step: int, loss: float, seconds: float, validation: dict | None = None) -> None:
        fields = {"loss": f"{loss:.4f}", "s/step": f"{seconds:.2f}"}
        if validation is not None:
            fields["val dB"] = f"{validation['dense_psnr']:.2f}/{validation['sparse_psnr']:.2f}"
        if self.bar is not None:
            self.bar.update(step - self.step)
            self.bar.set_postfix(fields, refresh=False)
        elif step == self.total or step % max(1, self.total // 20) == 0:
            print(f"{self.desc}: step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items()),
                  file=sys.stderr, flush=True)
        self.step = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
