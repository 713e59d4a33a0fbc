"""Check the engine's numbers against TIMM's own model in float32.

    python3 verification.py --model-name vit_base_patch16_224 [--dtype float16] [--param-path P]

Prints `vision transformer verification pass` and exits 0, or says what failed and exits 1.
"""
import click

from engine import EngineError
from engine.cli import (deterministic_option, device_option, dtype_option, engine_weights, fail_cleanly,
                        model_option, parse_dtype, resolve_config, variant_option, weights_options)


@click.command()
@model_option()
@variant_option("timm")
@device_option
@dtype_option()
@click.option("--batch-size", type=click.IntRange(min=0), default=4, show_default=True,
              help="images per check; 0 checks every batch size of the benchmark sweep")
@weights_options
@click.option("--param-path", type=click.Path(dir_okay=False), default=None,
              help="engine weight file to check (from weight_utils.py) instead of converting the source")
@click.option("--use-fp16-acc", type=bool, default=False, show_default=True,
              help="float16 accumulation in cuBLAS GEMMs (float16 only)")
@click.option("--use-graph", type=bool, default=None, help="capture a CUDA graph (default: on for CUDA)")
@click.option("--exact-gelu", is_flag=True, help="forbid the tanh-approximate GELU GEMM epilogue")
@deterministic_option
@fail_cleanly
def main(model_name, variant, device, dtype, batch_size, checkpoint, seed, pretrained, param_path,
         use_fp16_acc, use_graph, exact_gelu, deterministic):
    """Compare the engine with TIMM on the same weights."""
    from engine.compile import Options
    from engine.sweep import sweep_sizes
    from engine.target import detect
    from engine.verify import run_verification
    from modeling.config import describe

    cfg = resolve_config(model_name, variant)
    target = detect(device)
    dt = parse_dtype(dtype, target)
    state, source, source_model = engine_weights(cfg, dt, checkpoint, seed, pretrained, param_path,
                                                 need_source_model=True)
    click.echo(f"model: {describe(cfg, dt)} on {target.name}; engine weights: {source}")
    options = Options(use_graph=use_graph, fp16_acc=use_fp16_acc, exact_gelu=exact_gelu, deterministic=deterministic)
    failed = []
    for batch in sweep_sizes(target) if batch_size == 0 else [batch_size]:
        report = run_verification(cfg, state, source_model, target, dt, batch, options, seed=seed,
                                  log=lambda m: click.echo(m, err=True))
        click.echo(f"batch {batch}: {report.summary()}")
        if not report.passed:
            failed.append(batch)
            for reason in report.failures:
                click.echo(f"  FAIL: {reason}")
    if failed:
        raise EngineError(f"vision transformer verification failed at batch size {', '.join(map(str, failed))}")
    click.echo("vision transformer verification pass")


if __name__ == "__main__":
    main()
