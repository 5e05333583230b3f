"""How cached reference keys/values join each block's keys/values: concatenated into new tensors every block of
every step ("concat"), written into ONE buffer that every block reuses ("join", what the pack does: the memory of
one block), or written once into a buffer per block that then only receives the text + target rows per step
("per_block": the fastest, but it keeps every block's whole keys/values alive between steps).

    .venv/bin/python -P benchmarks/bench_cache_layout.py --json docs/cache_layout.json

Shapes of one block's attention (batch 1, head dim 128) at a 1024 px target with four references kept at 25 %
(scaled to ``--heads`` heads so it runs on a CPU); times are medians, with and without the attention itself.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))  # for packload only
from packload import load_pack  # noqa: E402

load_pack()
JoinBuffer = importlib.import_module("sparse_context.sparse_attention.reference_cache").JoinBuffer

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--text-target", type=int, default=512 + 4096, help="text + target tokens (queries)")
    ap.add_argument("--cached", type=int, default=4 * 1024, help="cached reference tokens")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev, h, n_q, n_c, d = torch.device(args.device), args.heads, args.text_target, args.cached, 128
    q, k, v = (torch.randn(1, h, n_q, d, device=dev) for _ in range(3))
    ck, cv = (torch.randn(1, h, n_c, d, device=dev) for _ in range(2))
    buf_k, buf_v = (torch.empty(1, h, n_q + n_c, d, device=dev) for _ in range(2))
    buf_k[:, :, n_q:], buf_v[:, :, n_q:] = ck, cv

    def concat():
        return torch.cat((k, ck), 2), torch.cat((v, cv), 2)

    def per_block():
        buf_k[:, :, :n_q].copy_(k)
        buf_v[:, :, :n_q].copy_(v)
        return buf_k, buf_v

    join_buffer = JoinBuffer()

    def join():
        return join_buffer.join(0, k, ck), join_buffer.join(1, v, cv)

    def timed(assemble, attend: bool) -> float:
        times = []
        for _ in range(args.repeats + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            kk, vv = assemble()
            if attend:
                torch.nn.functional.scaled_dot_product_attention(q, kk, vv)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:]) * 1000

    rows = {layout: {"assembly_ms": timed(fn, False), "with_attention_ms": timed(fn, True)}
            for layout, fn in (("concat", concat), ("join", join), ("per_block", per_block))}
    print("| layout | assembly ms | assembly + attention ms |\n|---|---|---|")
    for layout, r in rows.items():
        print(f"| {layout} | {r['assembly_ms']:.2f} | {r['with_attention_ms']:.1f} |")
    meta = {"heads": h, "head_dim": d, "queries": n_q, "cached": n_c, "device": str(dev),
            "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "layouts": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
