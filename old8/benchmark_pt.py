"""Benchmark TIMM's own model in PyTorch: eager (the original baseline) or torch.compile.

    python3 benchmark_pt.py [--model-name M] [--batch-size N] [--mode eager|compile|reduce-overhead|max-autotune]

Same sweep, harness and results format as benchmark_ait.py; eager writes
{model}_pt_benchmark_dev_{flag}.txt, other modes {model}_pt_{mode}_benchmark_dev_{flag}.txt.
Under `torchrun --nproc-per-node K`, N is the global batch and each process runs N/K, as in
benchmark_ait.py.
"""

import click

from engine.cli import (device_option, dtype_option, fail_cleanly, model_option, parse_dtype, resolve_config,
                        run_benchmark, time_budget_option, variant_option, weights_options)

MODES = ["eager", "compile", "reduce-overhead", "max-autotune"]


@click.command()
@model_option()
@variant_option("ait")
@click.option("--batch-size", type=click.IntRange(min=0), default=0, show_default=True,
              help="0: the whole sweep; N: only N (under torchrun: the global batch)")
@click.option("--mode", type=click.Choice(MODES), default="eager", show_default=True,
              help="eager, or torch.compile with that mode (reduce-overhead and max-autotune use CUDA graphs)")
@device_option
@dtype_option()
@weights_options
@click.option("--output-dir", type=click.Path(file_okay=False), default=".", show_default=True)
@time_budget_option
@fail_cleanly
def main(model_name, variant, batch_size, mode, device, dtype, checkpoint, seed, pretrained, output_dir, time_budget):
    """Benchmark TIMM's model in PyTorch."""
    import time

    import torch

    from engine.results import check_writable
    from engine.distributed import setup
    from engine.sweep import announce, sweep_sizes
    from modeling.config import describe
    from weight_utils import source_model

    cfg = resolve_config(model_name, variant)
    group, target = setup(device)
    dt = parse_dtype(dtype, target)
    if group.is_main:  # rank 0 writes the results
        check_writable(output_dir)
    sizes = group.global_sizes(batch_size, sweep_sizes(target))
    group.init(target)
    model, source = source_model(cfg, checkpoint, seed, pretrained)
    model = model.to(target.device, dt)
    say = (lambda m: click.echo(m, err=True)) if group.is_main else (lambda m: None)
    say(f"model: {describe(cfg, dt)} on {target.name}, PyTorch {mode}; weights: {source}")
    announce(group, sizes, sweep_sizes(target) if batch_size == 0 else sizes, say)

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
    run_benchmark("pt", mode, engine, cfg, target, dt, sizes, make_runner, output_dir, source, time_budget,
                  group, say)


if __name__ == "__main__":
    main()
