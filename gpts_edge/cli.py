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


def _version(value: bool) -> None:
    if value:
        from gpts_edge import __version__

        typer.echo(f"gpts-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """GPT-S-1.4M on the edge: train, export, run."""


def _fail(exc: GptsError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


@app.command()
def info(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Checkpoint folder, ONNX/ORT folder or file, or .gguf (default: the bundled model)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe a model (any format the project writes): parameters, config, files, sha256."""
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
    prompt: Annotated[
        str, typer.Argument(help="Prompt text (empty: start from <|endoftext|>; -: read it from stdin).")
    ] = "",
    model: Annotated[str | None, typer.Option(help="Checkpoint dir, ONNX folder or .gguf file.")] = None,
    runtime: Annotated[
        str | None, typer.Option(help="onnx | gguf | torch (default: gguf for a .gguf file, else onnx)")
    ] = None,
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
    from gpts_edge.generation import check_prompt, generate_text, sampling_options
    from gpts_edge.sampling import check_seed

    try:
        if prompt == "-":
            prompt = _read_stdin()
        check_prompt(prompt)  # before the model loads and before the prompt is echoed
        check_seed(seed)
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


def _read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GptsError(
            f"stdin: the prompt is not valid UTF-8 (byte 0x{data[exc.start]:02x} at {exc.start})"
        ) from None


@app.command()
def train(
    data: Annotated[
        list[str],
        typer.Option(help="PATH[:WEIGHT]: text, .jsonl(.gz), dir, glob or prepared dir; repeatable."),
    ],
    out: Annotated[str, typer.Option("-o", "--output", "--out", help="Run directory.")],
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
    calibrate: Annotated[
        bool | None, typer.Option(help="Fold a temperature fitted on the validation slice into the result.")
    ] = None,
    sampling: Annotated[str | None, typer.Option(help="random windows | passes over the text")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest snapshot in --out.")] = False,
    override_resume: Annotated[
        str | None,
        typer.Option(
            help="With --resume: settings allowed to differ from the snapshot's, e.g. lr,max_steps."
        ),
    ] = None,
    decontaminate: Annotated[
        str | None,
        typer.Option(help="Eval folder or file: drop documents sharing a 13-gram with it before tokenizing."),
    ] = None,
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
            calibrate=calibrate,
            sampling=sampling,
            resume=resume,
            override_resume=override_resume,
            decontaminate=decontaminate,
            progress=progress,
        )
        result = run_training(tc)
    except GptsError as exc:
        _fail(exc)
    typer.echo(json.dumps(result))


def _quantize(quantize: str | None, quant: str | None) -> str | None:
    """--quantize, or the older GGUF spelling --quant (kept as a hidden alias)."""
    if quantize is not None and quant is not None and quantize != quant:
        raise GptsError(f"--quantize {quantize} and --quant {quant} disagree; give one")
    return quantize if quantize is not None else quant


def _log(message: str) -> None:
    typer.echo(message, err=True)


FORCE_HELP = (
    "Write into a folder that holds other files (only the export's own files are replaced), "
    "or to a file of another name or format."
)
QUANTIZE_HELP = (
    "onnx/ort: none | int8 | int4; gguf: f32 | f16 | q8_0 | q4_0 | q4_mix (default: full precision)"
)


@app.command()
def export(
    format: Annotated[str, typer.Option("--format", help="onnx | gguf | ort | hf")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output file or folder.")],
    model: Annotated[
        str | None, typer.Option(help="Checkpoint directory (default: the bundled model).")
    ] = None,
    quantize: Annotated[str | None, typer.Option(help=QUANTIZE_HELP)] = None,
    quant: Annotated[str | None, typer.Option(hidden=True, help="Alias of --quantize.")] = None,
    arch: Annotated[str, typer.Option(help="GGUF: gpts | llama (plain-GQA checkpoints only)")] = "gpts",
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's choice).")] = None,
    layout: Annotated[
        str,
        typer.Option(
            help="ONNX: onnx | transformersjs (folder with onnx/model*.onnx; --quantize may list several)"
        ),
    ] = "onnx",
    force: Annotated[bool, typer.Option(help=FORCE_HELP)] = False,
    decode_graph: Annotated[
        bool, typer.Option(help="onnx/ort: also write the fast step graph (model.decode.onnx / .ort).")
    ] = True,
) -> None:
    """Export a checkpoint to ONNX (with KV cache), GGUF, ORT (mobile) or a Hugging Face folder."""
    from gpts_edge.formats import get_format

    try:
        fmt = get_format(format)
        q = _quantize(quantize, quant)
        if layout != "onnx" and format != "onnx":
            raise GptsError(f"--layout {layout}: only applies to --format onnx")
        if layout not in ("onnx", "transformersjs"):
            raise GptsError(f"--layout: unknown layout {layout!r}; choose from onnx, transformersjs")
        if arch != "gpts" and format != "gguf":
            raise GptsError(f"--arch {arch}: only applies to --format gguf")
        if not decode_graph and (format not in ("onnx", "ort") or layout != "onnx"):
            raise GptsError("--no-decode-graph: only applies to --format onnx and ort")
        if layout == "transformersjs":
            from gpts_edge.export.compat import export_transformersjs

            export_transformersjs(model, output, quantize=q or "none", opset=opset, log=_log, force=force)
            return
        extra: dict = {"decode_graph": decode_graph} if format in ("onnx", "ort") else {}
        if format == "onnx":
            extra["opset"] = opset
        elif opset is not None:
            raise GptsError(f"--opset: only applies to --format onnx (and ort through it), not {format}")
        if format == "gguf":
            extra["arch"] = arch
        fmt.export(model, output, quantize=q, log=_log, force=force, **extra)
    except GptsError as exc:
        _fail(exc)


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="A .gguf file or a Hugging Face folder.")],
    format: Annotated[str, typer.Option("--format", help="gguf | hf")],
    output: Annotated[str, typer.Option("-o", "--output", help="Checkpoint directory to write.")],
    force: Annotated[bool, typer.Option(help=FORCE_HELP)] = False,
) -> None:
    """Turn a GGUF file or HF folder back into a checkpoint directory."""
    from gpts_edge.formats import get_format

    try:
        get_format(format, importable=True).import_(source, output, force=force)
    except GptsError as exc:
        _fail(exc)
    typer.echo(f"wrote {output}")


@app.command()
def parity(
    format: Annotated[str, typer.Option("--format", help="onnx | gguf | ort")] = "onnx",
    model: Annotated[
        str | None, typer.Option(help="Checkpoint directory (default: the bundled model).")
    ] = None,
    quantize: Annotated[str | None, typer.Option(help=QUANTIZE_HELP)] = None,
    quant: Annotated[str | None, typer.Option(hidden=True, help="Alias of --quantize.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compare an export's logits with PyTorch; exits 1 when a bound fails."""
    from gpts_edge.parity import parity_report

    try:
        report = parity_report(format, model, quantize=_quantize(quantize, quant))
    except GptsError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for row in report["rows"]:
            mark = "ok " if row["ok"] else "FAIL"
            value = "NaN" if row["value"] is None else f"{row['value']:.4g}"
            typer.echo(f"{mark} {row['check']:48s} {value:<12} bound {row['bound']}")
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def bench(
    model: Annotated[
        str | None, typer.Option(help="Checkpoint directory (default: the bundled model).")
    ] = None,
    runtimes: Annotated[
        str, typer.Option(help="Comma-separated: onnx,onnx-int8,onnx-int4,torch,gguf,llamacpp[-q8_0|-q4_0]")
    ] = ("onnx,onnx-int8,onnx-int4,torch,gguf,llamacpp,llamacpp-q8_0,llamacpp-q4_0"),
    threads: Annotated[int, typer.Option(help="Threads per runtime (0: every core).")] = 1,
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
        if threads < 0 or repeat < 1 or new_tokens < 1 or prompt_tokens < 1:
            raise GptsError("--repeat, --new-tokens and --prompt-tokens must be >= 1, --threads >= 0")
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
    runtime: Annotated[
        str | None, typer.Option(help="onnx | gguf | torch (default: gguf for a .gguf file, else onnx)")
    ] = None,
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


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="Checkpoint dir, ONNX folder or .gguf file.")] = None,
    runtime: Annotated[
        str | None, typer.Option(help="onnx | gguf | torch (default: gguf for a .gguf file, else onnx)")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    parallel: Annotated[int, typer.Option(help="Sequences decoded together in one batched step.")] = 16,
    max_queue: Annotated[int, typer.Option(help="Sequences that may wait for a free row (then 429).")] = 64,
    threads: Annotated[int, typer.Option(help="Cores: an engine process each (0: every core).")] = 0,
    api_key: Annotated[
        str | None, typer.Option(help="Require 'Authorization: Bearer KEY' (or set GPTS_EDGE_API_KEY).")
    ] = None,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="One JSON log line per request.")] = False,
    in_process: Annotated[
        bool, typer.Option("--in-process", help="Decode on threads, no processes.")
    ] = False,
) -> None:
    """OpenAI-compatible completions server (/v1/completions, streaming, continuous batching)."""
    from gpts_edge.serve import serve as run_server

    try:
        run_server(
            model,
            runtime=runtime,
            host=host,
            port=port,
            parallel=parallel,
            max_queue=max_queue,
            threads=threads,
            api_key=api_key,
            json_logs=json_logs,
            in_process=in_process,
            log=lambda m: typer.echo(m, err=True),
        )
    except GptsError as exc:
        _fail(exc)


@tokenizer_app.command("train")
def tokenizer_train(
    data: Annotated[list[str], typer.Option(help="Text, .jsonl(.gz), directory or glob; repeatable.")],
    out: Annotated[str, typer.Option("-o", "--output", "--out", help="Output tokenizer.json.")],
    vocab_size: Annotated[int, typer.Option()] = 4096,
    force: Annotated[bool, typer.Option(help=FORCE_HELP)] = False,
) -> None:
    """Train a byte-level BPE tokenizer (<|endoftext|> = id 0)."""
    from gpts_edge.textdata import expand_paths
    from gpts_edge.tokenizer import check_tokenizer_output, iter_texts, save_tokenizer, train_tokenizer

    try:
        check_tokenizer_output(Path(out), force=force)
        files = [f for spec in data for f in expand_paths(spec)]
        tok = train_tokenizer(iter_texts(files), vocab_size)
        save_tokenizer(tok, Path(out), force=force)
    except GptsError as exc:
        _fail(exc)
    typer.echo(f"wrote {out} ({vocab_size} tokens)")


# --- data: statistics and eval-set contamination of training sources -------------------------
data_app = typer.Typer(no_args_is_help=True, help="Training-data tools: statistics, eval contamination.")
app.add_typer(data_app, name="data")


@data_app.command("stats")
def data_stats(
    data: Annotated[
        list[str], typer.Option(help="PATH[:WEIGHT] as for train: text, .jsonl(.gz), dir, glob.")
    ],
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer.json (default: the bundled one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Documents, bytes, tokens and bytes/token of each source."""
    from gpts_edge.training.datastats import format_stats, source_stats

    try:
        report = source_stats(data, tokenizer, log=lambda m: typer.echo(m, err=True))
    except GptsError as exc:
        _fail(exc)
    typer.echo(json.dumps(report, indent=2) if as_json else format_stats(report))


@data_app.command("check")
def data_check(
    data: Annotated[
        list[str], typer.Option(help="PATH[:WEIGHT] as for train: text, .jsonl(.gz), dir, glob.")
    ],
    against: Annotated[
        list[str], typer.Option(help="Eval folder (the layout of eval --data) or eval file; repeatable.")
    ],
    n: Annotated[int, typer.Option("--n", help="Words per n-gram (lowercased, punctuation split).")] = 13,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer.json (default: the bundled one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Documents and tokens of each source that share an n-gram with an eval item."""
    from gpts_edge.training.datastats import check_sources, format_check

    try:
        report = check_sources(data, against, n=n, tokenizer=tokenizer, log=lambda m: typer.echo(m, err=True))
    except GptsError as exc:
        _fail(exc)
    typer.echo(json.dumps(report, indent=2) if as_json else format_check(report))


def main() -> None:
    try:
        app()
    except OSError as exc:
        # A file the library did not expect to be unreadable (permissions, a full disk): still
        # one line naming it, never a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
