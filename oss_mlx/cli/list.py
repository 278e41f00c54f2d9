"""`oss-mlx list`: the models in the local store (broken ones too, with the reason)."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the list as JSON")


def main(args) -> int:
    from rich.table import Table

    from oss_mlx.cli.output import console
    from oss_mlx.store import human_size, list_models, store_root

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    out = console()
    if not rows:
        out.print(f"No models in {store_root()}. Get one with: oss-mlx convert "
                  "openai/gpt-oss-20b (or try: oss-mlx chat --demo)", markup=False)
        return 0
    table = Table(title=f"Models in {store_root()}", title_justify="left")
    for col in ("name", "size", "dense", "experts", "layers", "experts/top-k"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("size", "layers") else "left")
    for r in rows:
        if r["broken"]:
            table.add_row(r["name"], human_size(r["size"]), "[red]BROKEN[/]", "", "", "")
            continue
        table.add_row(r["name"], human_size(r["size"]), r["dense"], r["experts"],
                      str(r["layers"]), f"{r['num_experts']}/top-{r['top_k']}")
    out.print(table)
    for r in rows:
        if r["broken"]:
            out.print(f"{r['name']}: {r['broken']} (oss-mlx rm {r['name']} removes it)",
                      markup=False, style="red")
    return 0
