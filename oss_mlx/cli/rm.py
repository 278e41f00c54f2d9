"""`oss-mlx rm NAME`: remove a model from the local store, saying how much disk it freed."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help="store name(s) of the model(s) to remove (see `oss-mlx list`)")


def main(args) -> int:
    from oss_mlx.store import human_size, remove_model

    for name in args.names:
        freed = remove_model(name)
        print(f"removed {name} ({human_size(freed)} freed)")
    return 0
