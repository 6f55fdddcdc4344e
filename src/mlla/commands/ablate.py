"""``mlla ablate``: rerun the paper's design study (Tables 1-2) on a dataset: every ablation
variant trained with one recipe over several seeds, then a results table with intervals and a chart."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._task import MAX_FAILED_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..models.ablation import ABLATION_VARIANTS
    from ..tasks.study.ablate import STUDY_MODEL_KWARGS, STUDY_RECIPE, STUDY_SEEDS

    size = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in STUDY_MODEL_KWARGS.items())
    p = subparsers.add_parser(
        "ablate",
        help="rerun the paper's ablation study (all ablation_* variants, several seeds, one recipe) and tabulate it",
        description="Train a set of variants (default: every Table 1 and Table 2 variant and the controls) with one "
        "shared recipe, once per seed, on one dataset (default: the built-in study task), then write OUTPUT/table.md, "
        "runs.csv (per seed), results.csv/json (mean, std, 95% intervals, paired changes against the baseline) and "
        "chart.png. Rerunning continues: finished runs are not retrained, an interrupted one resumes; new variants or "
        "seeds train only the new runs. A folder holding a study of other settings or data is refused.",
    )
    p.add_argument("--output", default="runs/study", help="study folder (default runs/study)")
    p.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS), metavar="MODEL",
                   help="registered models to train, e.g. ablation_baseline resnet18 (default: all ablation_* variants)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(STUDY_SEEDS), metavar="SEED",
                   help=f"one run per variant and seed (default {' '.join(map(str, STUDY_SEEDS))})")
    p.add_argument("--data-dir", help="ImageFolder root with train/ and val/ (default: the built-in study task)")
    p.add_argument("--model-kwargs", nargs="*", metavar="NAME=VALUE",
                   help=f"model size shared by the variants that take it (default: {size}); a variant's own switch wins")
    p.add_argument("--full-size", action="store_true", help="the registered (Swin-T) size instead of the reduced width")
    p.add_argument("--config", help="YAML file of training settings over the study recipe (keys as `mlla train` flags)")
    p.add_argument("--epochs", type=int, help=f"default {STUDY_RECIPE['epochs']}")
    p.add_argument("-b", "--batch-size", type=int,
                   help=f"default {STUDY_RECIPE['batch_size']}, lowered to the training set's size when that is smaller")
    p.add_argument("--img-size", type=int, help=f"default {STUDY_RECIPE['img_size']}")
    p.add_argument("--lr", type=float, help="absolute peak learning rate")
    p.add_argument("--max-failed-fraction", type=float, help=MAX_FAILED_HELP)
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads per training process (default: CPUs / jobs)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--train-per-class", type=int, help="built-in task: training images per class (default 500)")
    p.add_argument("--val-per-class", type=int, help="built-in task: validation images per class (default 100)")
    p.add_argument("--bench-rounds", type=int, default=5, help="interleaved throughput rounds (default 5)")
    p.add_argument("--new-study", action="store_true",
                   help="if OUTPUT holds a study of other settings or data, move it to OUTPUT/previous-N/ and start anew")
    p.add_argument("--report", action="store_true",
                   help="train nothing: rebuild results.csv/json, table.md and chart.png from OUTPUT's runs.csv and variants.csv")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.config import load_yaml, parse_kwargs
    from ..tasks.study.ablate import STUDY_MODEL_KWARGS, STUDY_RECIPE, StudySpec, run_study
    from ..tasks.study.report import format_study_table, read_study_files, write_summary

    if args.report:
        rows, paths = write_summary(*read_study_files(args.output), args.output)
        print(format_study_table(rows))
        print(f"\n{', '.join(str(p) for p in paths.values())}")
        return 0
    recipe = dict(STUDY_RECIPE)
    if args.config:
        recipe.update(load_yaml(args.config))
    if "seed" in recipe:
        raise ValueError(f"{args.config}: give seeds with --seeds, not as 'seed' in the recipe")
    for name in ("epochs", "batch_size", "img_size", "lr", "max_failed_fraction"):
        if getattr(args, name) is not None:
            recipe[name] = getattr(args, name)
    model_kwargs = {} if args.full_size else dict(STUDY_MODEL_KWARGS)
    if args.model_kwargs:
        model_kwargs.update(parse_kwargs(args.model_kwargs))
    study_data = {k: getattr(args, k) for k in ("train_per_class", "val_per_class") if getattr(args, k) is not None}
    if args.data_dir is not None and study_data:
        raise ValueError("--train-per-class/--val-per-class size the built-in task; drop them with --data-dir")
    explicit_batch = args.batch_size is not None or (args.config and "batch_size" in load_yaml(args.config))
    spec = StudySpec(
        output=Path(args.output), variants=args.variants, seeds=args.seeds, model_kwargs=model_kwargs, recipe=recipe,
        data_dir=args.data_dir, jobs=args.jobs, threads=args.threads, device=args.device,
        bench_rounds=args.bench_rounds, progress=args.progress, study_data=study_data,
        fit_batch=not explicit_batch, new_study=args.new_study,
    )
    rows = run_study(spec)
    if rows is None:
        return 1
    print(format_study_table(rows))
    print(f"\ntable, per-seed and aggregate CSV, JSON and chart in {args.output}")
    return 0
