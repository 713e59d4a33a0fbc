"""Benchmark TIMM's own model in PyTorch: eager (the original baseline) or torch.compile.

    python3 benchmark_pt.py [--model-name M] [--batch-size N] [--mode eager|compile|reduce-overhead|max-autotune]

Same sweep, harness and results format as benchmark_ait.py; eager writes
{model}_pt_benchmark_dev_{flag}.txt, other modes {model}_pt_{mode}_benchmark_dev_{flag}.txt.
"""
import sys

import click

from engine.cli import (device_option, dtype_option, fail_cleanly, model_option, parse_dtype, resolve_config,
                        variant_option, weights_options)

MODES = ["eager", "compile", "reduce-overhead", "max-autotune"]


@click.command()
@model_option()
@variant_option("ait")
@click.option("--batch-size", type=click.IntRange(min=0), default=0, show_default=True,
              help="0: the whole sweep; N: only N")
@click.option("--mode", type=click.Choice(MODES), default="eager", show_default=True,
              help="eager, or torch.compile with that mode (reduce-overhead and max-autotune use CUDA graphs)")
@device_option
@dtype_option()
@weights_options
@click.option("--output-dir", type=click.Path(file_okay=False), default=".", show_default=True)
@fail_cleanly
def main(model_name, variant, batch_size, mode, device, dtype, checkpoint, seed, pretrained, output_dir):
    """Benchmark TIMM's model in PyTorch."""
    import time

    import torch

    from engine.results import check_writable, results_stem
    from engine.sweep import run_sweep, sweep_sizes
    from engine.target import detect, visible_devices_flag
    from modeling.config import describe
    from weight_utils import source_model

    cfg = resolve_config(model_name, variant)
    target = detect(device)
    dt = parse_dtype(dtype, target)
    check_writable(output_dir)
    model, source = source_model(cfg, checkpoint, seed, pretrained)
    model = model.to(target.device, dt)
    sizes = sweep_sizes(target) if batch_size == 0 else [batch_size]
    click.echo(f"model: {describe(cfg, dt)} on {target.name}, PyTorch {mode}; weights: {source}", err=True)

    def make_runner(batch):
        images = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=target.device, dtype=dt)
        if mode == "eager":
            net = model
        else:
            torch._dynamo.reset()
            net = torch.compile(model, mode=None if mode == "compile" else mode, dynamic=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            net(images)
            if target.is_gpu:
                torch.cuda.synchronize()

        def run():
            with torch.inference_mode():
                return net(images)
        return run, {"compile_s": round(time.perf_counter() - t0, 2) if mode != "eager" else 0.0}

    engine = "pt" if mode == "eager" else f"pt_{mode}"
    stem = results_stem(model_name, engine, visible_devices_flag(target))
    complete = run_sweep("pt", mode, cfg, target, dt, sizes, make_runner, output_dir, stem, str(source),
                         log=lambda m: click.echo(m, err=True))
    click.echo(f"results: {stem}.txt, {stem}.json in {output_dir}")
    if not complete:
        click.echo("error: the sweep was partial (some batch sizes ran out of memory)", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
