"""List what is available: datasets, models, training methods, attacks, bound methods."""
from __future__ import annotations

import argparse

NAME = "info"
HELP = "list datasets, models, training methods, attacks and bound methods"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-for", default=None, metavar="DATASET", help="only models that support DATASET")


def bound_methods() -> list[str] | None:
    """Names from ``certorch.bounds`` if it exposes a list (imported lazily), else ``None``."""
    try:
        import certorch.bounds as b
    except Exception:  # the bound engine is optional here
        return None
    for attr in ("list_methods", "list_bound_methods", "list_bounds"):
        fn = getattr(b, attr, None)
        if callable(fn):
            try:
                return sorted(fn())
            except Exception:
                return None
    return None


def run(args: argparse.Namespace) -> int:
    from certorch.attacks import list_attacks
    from certorch.data import DATASETS
    from certorch.models import list_models
    from certorch.train.objectives import list_objectives, objective_help

    models = list_models(args.models_for)  # validates --models-for before anything is printed
    print("datasets:")
    for name, info in sorted(DATASETS.items()):
        shape = "x".join(map(str, info.input_shape))
        print(f"  {name:<14} {shape:<8} {info.num_classes} classes  {info.description}")
    print("models:" if args.models_for is None else f"models for {args.models_for}:")
    print("  " + ", ".join(models))
    print("methods (training objectives):")
    for name in list_objectives():
        print(f"  {name:<14} {objective_help(name)}")
    print("attacks:")
    print("  " + ", ".join(list_attacks()))
    methods = bound_methods()
    if methods is not None:
        print("bound methods:")
        print("  " + ", ".join(methods))
    return 0
