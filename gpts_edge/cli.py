"""`gpts-edge`: a thin typer layer; every command is one call into a library function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from gpts_edge.errors import GptsError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="GPT-S-1.4M on the edge: train, export, run.",
)
tokenizer_app = typer.Typer(no_args_is_help=True, help="Tokenizer tools.")
app.add_typer(tokenizer_app, name="tokenizer")


def _fail(exc: GptsError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


@app.command()
def info(
    model: Annotated[
        str | None, typer.Argument(help="Checkpoint directory (default: the bundled model).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe a checkpoint: parameters, config, vocabulary, files, weights sha256."""
    from gpts_edge.inspect import describe

    try:
        d = describe(model)
    except GptsError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(f"checkpoint   {d['checkpoint']}")
    typer.echo(f"format       {d['format']}")
    typer.echo(f"parameters   {d['parameters']:,}")
    typer.echo(f"vocabulary   {d['vocab_size']:,}")
    typer.echo(f"weights      sha256 {d['weights_sha256']}")
    for k, v in d["config"].items():
        typer.echo(f"  {k:24s} {v}")
    for name, size in d["files"].items():
        typer.echo(f"  file {name:28s} {size:>10,} bytes")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text (empty: start from <|endoftext|>).")] = "",
    model: Annotated[str | None, typer.Option(help="Checkpoint dir, ONNX folder or .gguf file.")] = None,
    runtime: Annotated[str, typer.Option(help="torch | onnx | gguf")] = "onnx",
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to generate.")] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    repetition_penalty: Annotated[float | None, typer.Option()] = None,
    no_repeat_ngram_size: Annotated[int | None, typer.Option()] = None,
    greedy: Annotated[bool, typer.Option(help="Always take the most likely token.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same text.")] = 0,
    stream: Annotated[bool, typer.Option(help="Print tokens as they come.")] = False,
) -> None:
    """Continue a prompt with the shared sampler."""
    from gpts_edge.api import open_runtime
    from gpts_edge.generation import generate_text, sampling_options

    try:
        rt = open_runtime(runtime, model)
        opts = sampling_options(
            rt.generation_config,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            greedy=greedy,
            max_new_tokens=max_new_tokens,
        )
        pieces = generate_text(rt, prompt, opts, seed=seed, warn=lambda m: typer.echo(m, err=True))
        typer.echo(prompt, nl=False)
        for piece in pieces:
            typer.echo(piece, nl=False)
            if stream:
                sys.stdout.flush()
        typer.echo("")
    except GptsError as exc:
        _fail(exc)


@app.command()
def train(
    data: Annotated[
        list[str],
        typer.Option(help="PATH[:WEIGHT]: text, .jsonl(.gz), dir, glob or prepared dir; repeatable."),
    ],
    out: Annotated[str, typer.Option(help="Run directory.")],
    preset: Annotated[
        str | None,
        typer.Option(help="gpt-s-1.4m | finetune | tiny (default: finetune with --init, else gpt-s-1.4m)"),
    ] = None,
    tokens: Annotated[int | None, typer.Option(help="Total training tokens.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Total optimizer steps (sets the schedule).")] = None,
    stop_at: Annotated[
        int | None, typer.Option(help="Stop after this step, keeping the schedule of --max-steps.")
    ] = None,
    time_limit: Annotated[
        float | None, typer.Option(help="Seconds of training; sets --max-steps from measured speed.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    grad_accum: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    warmup: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")] = "auto",
    compile: Annotated[bool, typer.Option(help="torch.compile the model.")] = False,
    seed: Annotated[int | None, typer.Option()] = None,
    eval_every: Annotated[int | None, typer.Option()] = None,
    ckpt_every: Annotated[int | None, typer.Option()] = None,
    log_every: Annotated[int | None, typer.Option()] = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer.json (default: the bundled one).")] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Fine-tune these weights: 'default', a checkpoint dir, a .gguf file or an HF folder."
        ),
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training text.")] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Hold out this tail of the text for validation (finetune: 0.05).")
    ] = None,
    keep: Annotated[
        str | None, typer.Option(help="Top-level checkpoint: best (validation) | last (finetune: best).")
    ] = None,
    cpu_micro_batch: Annotated[
        int | None, typer.Option(help="On CPU, run larger batches as micro-batches of this size (0: off).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest snapshot in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train GPT-S (the card's recipe as preset gpt-s-1.4m; every number can be overridden)."""
    from gpts_edge.training.train import preset_config
    from gpts_edge.training.train import train as run_training

    try:
        tc = preset_config(
            preset,
            data=data,
            out=out,
            tokens=tokens,
            max_steps=max_steps,
            stop_at=stop_at,
            time_limit=time_limit,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            warmup=warmup,
            device=device,
            dtype=dtype,
            compile=compile,
            seed=seed,
            eval_every=eval_every,
            ckpt_every=ckpt_every,
            log_every=log_every,
            tokenizer=tokenizer,
            init=init,
            epochs=epochs,
            val_fraction=val_fraction,
            keep=keep,
            cpu_micro_batch=cpu_micro_batch,
            resume=resume,
            progress=progress,
        )
        result = run_training(tc)
    except GptsError as exc:
        _fail(exc)
    typer.echo(json.dumps(result))


@app.command()
def export(
    format: Annotated[str, typer.Option("--format", help="onnx | gguf | ort | hf")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output file or folder.")],
    model: Annotated[
        str | None, typer.Option(help="Checkpoint directory (default: the bundled model).")
    ] = None,
    quantize: Annotated[str, typer.Option(help="ONNX: none | int8 | int4")] = "none",
    quant: Annotated[str, typer.Option(help="GGUF: f32 | f16 | q8_0 | q4_0")] = "f32",
    arch: Annotated[str, typer.Option(help="GGUF: gpts | llama (plain-GQA checkpoints only)")] = "gpts",
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's choice).")] = None,
    layout: Annotated[
        str,
        typer.Option(
            help="ONNX: onnx | transformersjs (folder with onnx/model*.onnx; --quantize may list several)"
        ),
    ] = "onnx",
) -> None:
    """Export a checkpoint to ONNX (with KV cache), GGUF, ORT (mobile) or a Hugging Face folder."""
    try:
        if layout != "onnx" and format != "onnx":
            raise GptsError(f"--layout {layout}: only applies to --format onnx")
        if format == "onnx" and layout == "transformersjs":
            from gpts_edge.export.compat import export_transformersjs

            export_transformersjs(
                model, output, quantize=quantize, opset=opset, log=lambda m: typer.echo(m, err=True)
            )
        elif format == "onnx" and layout != "onnx":
            raise GptsError(f"--layout: unknown layout {layout!r}; choose from onnx, transformersjs")
        elif format == "onnx":
            from gpts_edge.export.onnx import export_onnx

            export_onnx(model, output, quantize=quantize, opset=opset, log=lambda m: typer.echo(m, err=True))
        elif format == "gguf":
            from gpts_edge.export.gguf import export_gguf

            export_gguf(model, output, quant=quant, arch=arch, log=lambda m: typer.echo(m, err=True))
        elif format == "ort":
            from gpts_edge.export.ort import export_ort

            export_ort(model, output, quantize=quantize, log=lambda m: typer.echo(m, err=True))
        elif format == "hf":
            from gpts_edge.export.hf import export_hf

            export_hf(model, output, log=lambda m: typer.echo(m, err=True))
        else:
            raise GptsError(f"--format: unknown format {format!r}; choose from onnx, gguf, ort, hf")
    except GptsError as exc:
        _fail(exc)


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="A .gguf file or a Hugging Face folder.")],
    format: Annotated[str, typer.Option("--format", help="gguf | hf")],
    output: Annotated[str, typer.Option("-o", "--output", help="Checkpoint directory to write.")],
) -> None:
    """Turn a GGUF file or HF folder back into a checkpoint directory."""
    try:
        if format == "gguf":
            from gpts_edge.export.gguf import import_gguf

            import_gguf(source, output)
        elif format == "hf":
            from gpts_edge.export.hf import import_hf

            import_hf(source, output)
        else:
            raise GptsError(f"--format: unknown format {format!r}; choose from gguf, hf")
    except GptsError as exc:
        _fail(exc)
    typer.echo(f"wrote {output}")


@app.command()
def parity(
    format: Annotated[str, typer.Option("--format", help="onnx | gguf | ort")] = "onnx",
    model: Annotated[
        str | None, typer.Option(help="Checkpoint directory (default: the bundled model).")
    ] = None,
    quantize: Annotated[str, typer.Option(help="ONNX: none | int8 | int4")] = "none",
    quant: Annotated[str, typer.Option(help="GGUF: f32 | f16 | q8_0 | q4_0")] = "f32",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compare an export's logits with PyTorch; exits 1 when a bound fails."""
    try:
        if format in ("onnx", "ort"):
            from gpts_edge.export.onnx import parity_report

            report = parity_report(model, quantize=quantize, ort_format=format == "ort")
        elif format == "gguf":
            from gpts_edge.export.gguf import parity_report as gguf_parity

            report = gguf_parity(model, quant=quant)
        else:
            raise GptsError(f"--format: unknown format {format!r}; choose from onnx, gguf, ort")
    except GptsError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for row in report["rows"]:
            mark = "ok " if row["ok"] else "FAIL"
            typer.echo(f"{mark} {row['check']:40s} {row['value']:<14} bound {row['bound']}")
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def bench(
    model: Annotated[
        str | None, typer.Option(help="Checkpoint directory (default: the bundled model).")
    ] = None,
    runtimes: Annotated[
        str, typer.Option(help="Comma-separated: onnx,onnx-int8,onnx-int4,torch,gguf,llamacpp")
    ] = ("onnx,onnx-int8,onnx-int4,torch,gguf,llamacpp"),
    threads: Annotated[int, typer.Option(help="Threads per runtime.")] = 1,
    prompt_tokens: Annotated[int, typer.Option()] = 32,
    new_tokens: Annotated[int, typer.Option()] = 256,
    repeat: Annotated[int, typer.Option(help="Workers per runtime; the median is reported.")] = 5,
    train: Annotated[bool, typer.Option("--train", help="Measure trainer throughput instead.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Measure decode tokens/s, prefill, TTFT, cold start, memory and size of every runtime."""
    from gpts_edge.bench import format_table, run_bench, train_bench

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    try:
        if train:
            result = train_bench(log=log)
            typer.echo(json.dumps(result, indent=2))
            return
        names = [r.strip() for r in runtimes.split(",") if r.strip()]
        if threads < 1 or repeat < 1 or new_tokens < 1 or prompt_tokens < 1:
            raise GptsError("--threads, --repeat, --new-tokens and --prompt-tokens must be >= 1")
        report = run_bench(
            model,
            names,
            threads=threads,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            repeat=repeat,
            log=log,
        )
    except GptsError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps({**report["results"], "_meta": report["meta"]}, indent=2))
    else:
        typer.echo(format_table(report))


@app.command("eval")
def eval_(
    task: Annotated[
        str, typer.Option(help="hellaswag | arc_easy | arc_challenge | piqa | mc | all (or a comma list)")
    ],
    data: Annotated[str, typer.Option(help="The task's file, or a folder holding the files (all tasks).")],
    model: Annotated[str | None, typer.Option(help="Checkpoint dir, ONNX folder or .gguf file.")] = None,
    runtime: Annotated[str, typer.Option(help="torch | onnx | gguf")] = "torch",
    limit: Annotated[int | None, typer.Option(help="Score only the first N items of each task.")] = None,
    batch_size: Annotated[int, typer.Option(help="Items (all their choices) per forward call.")] = 16,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON {task: {acc, acc_norm, n, ...}}.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show items done and items/s on stderr.")] = True,
) -> None:
    """Zero-shot multiple-choice accuracy (lm-evaluation-harness scoring); see docs/eval.md."""
    from gpts_edge.api import open_runtime
    from gpts_edge.evaluate import evaluate, expand_tasks, format_table

    try:
        tasks = expand_tasks(task)
        rt = open_runtime(runtime, model)
        results = evaluate(rt, tasks, data, limit=limit, batch_size=batch_size, progress=progress)
    except GptsError as exc:
        _fail(exc)
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))


@app.command()
def perplexity(
    files: Annotated[list[str], typer.Argument(help="UTF-8 text files to score.")],
    model: Annotated[
        str | None, typer.Option(help="Checkpoint dir, ONNX folder/file, .ort or .gguf (default: bundled).")
    ] = None,
    runtime: Annotated[str, typer.Option(help="onnx | torch | gguf")] = "onnx",
    stride: Annotated[
        int | None, typer.Option(help="Window step in tokens (default: the context, no overlap).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON {files: {...}, total: {...}}.")] = False,
) -> None:
    """Mean NLL, perplexity and bits per byte of text files under a model."""
    from gpts_edge.api import open_runtime
    from gpts_edge.perplexity import format_report, perplexity_report

    try:
        rt = open_runtime(runtime, model)
        report = perplexity_report(rt, files, stride, log=lambda m: typer.echo(m, err=True))
    except GptsError as exc:
        _fail(exc)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@app.command()
def web(
    model: Annotated[
        str | None,
        typer.Option(
            help="Exported ONNX folder, .onnx file or checkpoint folder "
            "(default: the cached ONNX export of the bundled model)."
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Serve the browser example (onnxruntime-web, WASM) with a model, offline."""
    from gpts_edge.web import serve

    try:
        serve(model, host=host, port=port, log=lambda m: typer.echo(m, err=True))
    except GptsError as exc:
        _fail(exc)


@tokenizer_app.command("train")
def tokenizer_train(
    data: Annotated[list[str], typer.Option(help="Text, .jsonl(.gz), directory or glob; repeatable.")],
    out: Annotated[str, typer.Option(help="Output tokenizer.json.")],
    vocab_size: Annotated[int, typer.Option()] = 4096,
) -> None:
    """Train a byte-level BPE tokenizer (<|endoftext|> = id 0)."""
    from gpts_edge.textdata import expand_paths
    from gpts_edge.tokenizer import iter_texts, save_tokenizer, train_tokenizer

    try:
        files = [f for spec in data for f in expand_paths(spec)]
        tok = train_tokenizer(iter_texts(files), vocab_size)
        save_tokenizer(tok, Path(out))
    except GptsError as exc:
        _fail(exc)
    typer.echo(f"wrote {out} ({vocab_size} tokens)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
