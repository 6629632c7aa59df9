"""`dsmd demo data | teacher`: draw the shapes-world dataset, fit the demo teacher on it. No torch at import."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.config import stage_config
from pipeline.console import console, get_config, make_progress
from pipeline.errors import DsmdError

demo_app = typer.Typer(
    help="The built-in demo: the shapes-world dataset and a small BEiT-3 teacher fitted on it.", no_args_is_help=True
)

FIT_REPORT = "demo_teacher_fit.json"


@demo_app.command("data")
def data(ctx: typer.Context) -> None:
    """Generate the shapes-world demo dataset (settings: demo.*)."""
    from stages.demo.shapes import generate_pretrain_corpus, generate_shapes

    cfg = stage_config(get_config(ctx), "demo_data").demo
    started = time.perf_counter()
    path = generate_shapes(cfg)
    corpus = generate_pretrain_corpus(cfg)
    total = cfg.n_train + cfg.n_val + cfg.n_test
    console.print(
        f"shapes world: {total:,} images ({cfg.n_train:,} train / {cfg.n_val:,} val / {cfg.n_test:,} test), "
        f"{cfg.captions_per_image} captions each -> {path}; the teacher's pretraining corpus: {cfg.n_pretrain:,} "
        f"other images -> {corpus}; {time.perf_counter() - started:.1f} s",
        highlight=False,
        markup=False,
    )


@demo_app.command("teacher")
def teacher(ctx: typer.Context) -> None:
    """Fit the small demo BEiT-3 on the pretraining corpus of `dsmd demo data` (demo.pretrain_dir; with
    demo.n_pretrain = 0 on the canonical dataset's train split instead), settings demo_teacher.*, teacher.*, and
    the second one of demo_teacher.second when it is named (written where its extra_teachers entry points).

    Writes the checkpoint, JSON config and .spm where teacher.checkpoint / teacher.size / teacher.tokenizer
    point, and demo_teacher.out_dir/demo_teacher_fit[_<name>].json with the test-split recall and chance level.
    """
    from pipeline.data.canonical import CanonicalDataset
    from stages.demo.teacher import second_teacher_config

    full = get_config(ctx)
    # Only the settings pipeline/config/stages.py declares for demo_teacher: a read of another raises.
    cfg = stage_config(full, "demo_teacher")
    if not (Path(cfg.data.canonical_dir) / "dataset.json").exists():
        raise DsmdError(f"{cfg.data.canonical_dir}: no canonical dataset yet; run `dsmd demo data` and "
                        "`dsmd data prepare` first")
    second = second_teacher_config(full)  # checked before the first fit, not after it
    dataset = CanonicalDataset.load(cfg.data.canonical_dir)
    corpus = _pretrain_corpus(cfg) if cfg.demo.n_pretrain else dataset
    _fit_and_report(cfg, corpus, dataset, FIT_REPORT)
    if second is not None:
        report = FIT_REPORT.replace(".json", f"_{second.teacher.name}.json")
        _fit_and_report(stage_config(second, "demo_teacher"), corpus, dataset, report)


def _pretrain_corpus(cfg):
    """The corpus as a canonical dataset (prepared under demo_teacher.out_dir, checked like any dataset)."""
    from pipeline.config import DataConfig
    from pipeline.data.canonical import prepare_dataset
    from stages.demo.shapes import PRETRAIN_FILE

    root = Path(cfg.demo.pretrain_dir)
    source = root / PRETRAIN_FILE
    if not source.is_file():
        raise DsmdError(f"{source}: the demo teacher's pretraining corpus is missing; run `dsmd demo data` (or set "
                        "demo.n_pretrain=0 to fit the teacher on the train split)")
    data = DataConfig(source=str(source), images_root=str(root / "images"), name="shapes-pretrain",
                      canonical_dir=str(Path(cfg.demo_teacher.out_dir) / "pretrain_canonical"))
    return prepare_dataset(data)


def _fit_and_report(cfg, corpus, dataset, report_name: str) -> None:
    """Fit on ``corpus``'s train split, score on ``dataset``'s evaluate.split."""
    from rich.table import Table

    from pipeline.models.teachers import load_teacher
    from pipeline.retrieval.metrics import chance_metrics, retrieval_metrics
    from stages.demo.teacher import encode_split, fit_demo_teacher, write_fit_report

    name = cfg.teacher.name
    with make_progress() as progress:
        task = progress.add_task(f"fitting the demo teacher {name}", total=None, rate="")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, rate=f"loss {loss:.3f}")

        result = fit_demo_teacher(cfg, corpus, on_step=on_step)
    console.print(
        f"demo teacher {name}: {result.steps} steps over {result.train_captions:,} captions of "
        f"{result.train_images:,} images in {result.seconds:.0f} s; tokenizer {result.vocab_pieces} pieces -> "
        f"{result.checkpoint}",
        highlight=False,
    )
    _print_skipped(result.skipped_images, "pretraining" if corpus is not dataset else "train")

    teacher = load_teacher(cfg.teacher, device="cpu", precision="fp32")
    split = cfg.evaluate.split
    image_emb, text_emb, caption_image, skipped = encode_split(teacher, dataset, split)
    _print_skipped(skipped, split)
    metrics = retrieval_metrics(image_emb, text_emb, caption_image, cfg.evaluate.ks)
    chance = chance_metrics(len(image_emb), caption_image, cfg.evaluate.ks)
    report = Path(cfg.demo_teacher.out_dir) / report_name
    write_fit_report(report, result, metrics, chance, split=split, skipped=skipped)

    table = Table(title=f"demo teacher {name}, {split} split ({len(image_emb):,} images, {len(text_emb):,} "
                  "captions)", title_justify="left")
    table.add_column("")
    for key in metrics:
        table.add_column(key, justify="right")
    table.add_row("teacher", *(f"{v:.2f}" for v in metrics.values()))
    table.add_row("chance", *(f"{chance[k]:.2f}" for k in metrics))
    console.print(table)
    console.print(f"report: {report}", highlight=False)


def _print_skipped(skipped: dict[int, str], split: str) -> None:
    if skipped:
        image_id, reason = next(iter(skipped.items()))
        from rich.markup import escape

        console.print(f"[yellow]skipped {len(skipped):,} {split} images[/yellow] that cannot be used (image "
                      f"{image_id}: {escape(reason)}); all are listed in the fit report", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(demo_app, name="demo")
