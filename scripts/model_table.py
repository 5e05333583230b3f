"""The README's model table, generated from the family adapters (``sparse_attention/families``).

    python3 scripts/model_table.py            # print the table
    python3 scripts/model_table.py --write    # replace it in README.md (between the model-table markers)

Needs torch (the pack's modules import it), not ComfyUI.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packload import REPO, load_pack  # noqa: E402

HOSTS = ("0.3.75", "0.10.0", "0.30.0")  # the compatibility matrix
BEGIN, END = "<!-- model-table:begin -->", "<!-- model-table:end -->"


def _hosts(first: str) -> str:
    return ", ".join(HOSTS[HOSTS.index(first):])


def render() -> str:
    load_pack()
    families = importlib.import_module("sparse_context.sparse_attention.families")
    rows = ["| Model | Diffusion-model class | Hosts (of the matrix) | Status | Positions | "
            "Reference cache / `attention` rule | t=0 references |", "|---|---|---|---|---|---|---|"]
    for f in families.FAMILIES:
        cache = "yes" if f.cache_layout else f"no: {f.cache_refusal}"
        for model, first, t0 in f.variants:
            rows.append(f"| {model} | `{f.class_path}` | {_hosts(first)} | sparse (exact), hook `{f.hook}` | "
                        f"{f.positions} | {cache} | {t0} |")
    for d in families.DENSE_FAMILIES:
        rows.append(f"| {d.name} | `{d.class_path}` | {_hosts(d.first_host)} | dense: {d.reason} | | n/a | n/a |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    table = render()
    if not args.write:
        print(table)
        return
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
