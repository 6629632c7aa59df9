"""`dsmd evaluate` and `dsmd search` (no torch at import time)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.config import stage_config
from pipeline.console import console, get_config


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(ctx: typer.Context) -> None:
        """Score the student and the teacher (from the store) on the test split; save indexes and a report."""
        from stages.evaluate.run import run_evaluate

        run_evaluate(stage_config(get_config(ctx), "evaluate"))

    @app.command("experiments")
    def experiments(
        ctx: typer.Context,
        out: Path = typer.Option(Path("runs/experiments"), "--out", help="Where the table files go."),
        for_report: bool = typer.Option(
            True, "--for-report/--no-report", help="Also save it at evaluate.ablations for the evaluation report."
        ),
        rev: list[str] = typer.Option(
            None, "--rev", help="Gather the experiments of this commit (repeatable; default HEAD's): runs queued on "
            "an earlier commit stay in the table.",
        ),
    ) -> None:
        """Gather the finished DVC experiments (e.g. the ablations) into one comparison table."""
        from rich.table import Table

        from stages.evaluate.experiments import cell_text, collect, save_for_report, write_table

        cfg = get_config(ctx)
        varying, rows = collect(".", f"{cfg.evaluate.out_dir}/metrics", revs=rev or None)
        paths = write_table(out, varying, rows)
        # The files hold every column; on the terminal, what each run changed against the first row (the
        # baseline) and its scores fit any width.
        table = Table(title="experiments (full table in the files below)")
        for column in ("experiment", "changed vs first row", "student RSUM", "teacher RSUM", "ratio"):
            table.add_column(column, overflow="fold")
        for row in rows:
            changed = [f"{k.removeprefix('distill.')}={cell_text(row.get(k), False)}"
                       for k in varying if row.get(k) != rows[0].get(k)]
            table.add_row(str(row["experiment"]), " ".join(changed) or "-",
                          *(cell_text(row.get(m)) for m in ("student.rsum", "teacher.rsum", "run.rsum_ratio")))
        console.print(table)
        console.print(f"{len(rows)} experiment(s): {paths['md']}, {paths['html']}, {paths['csv']}")
        target = cfg.evaluate.ablations
        if for_report and target:
            save_for_report(Path(target), varying, rows)
            console.print(f"saved for the report: {target} (`dvc repro` reruns evaluate with it)", highlight=False)

    @app.command("search")
    def search(
        ctx: typer.Context,
        query: str = typer.Argument(None, help="A caption to search images with."),
        image: Path = typer.Option(None, "--image", help="An image to search captions with."),
        top: int = typer.Option(5, "--top", min=1, help="Number of results."),
        index_dir: Path = typer.Option(None, "--index", help="Saved index dir (default: evaluate.out_dir/index)."),
        student_dir: Path = typer.Option(None, "--student", help="Saved student (default: distill.out_dir/student)."),
        bundle: Path = typer.Option(None, "--bundle", help="Search a bundle from `dsmd export` instead (no torch)."),
    ) -> None:
        """Search a saved index: prints rank, id, score and path (or caption)."""
        if bundle is not None:
            # Torch-free: neither the config nor the student is read.
            from pipeline.retrieval.bundle import search_bundle

            results = search_bundle(bundle, query, top, image=image)
        else:
            from stages.evaluate.search import search as run_search

            cfg = get_config(ctx)
            results = run_search(
                student_dir or Path(cfg.distill.out_dir) / "student",
                index_dir or Path(cfg.evaluate.out_dir) / "index",
                text=query,
                image=image,
                top=top,
            )
        for hit in results:
            where = hit.get("path") or hit.get("caption", "")
            typer.echo(f"{hit['rank']:>3}  {hit['id']:>8}  {hit['score']:.4f}  {where}")
        console.print(f"{len(results)} result(s)")
