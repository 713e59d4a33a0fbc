"""Compile and benchmark the fused engine over batch sizes.

    python3 benchmark_ait.py [--model-name M] [--batch-size N] [--use-fp16-acc B] [--use-graph B]

N=0 (default) compiles and benchmarks each of 1, 2, 4, ..., 256 (1, 2, 4 on a CPU); N>0
benchmarks that size, reusing the implementation choices an earlier run cached under ./tmp/.
Appends `batch_size: N, latency: T` (ms) to {model}_ait_benchmark_dev_{flag}.txt and the full
rows (spread, memory, plan, environment) to the .json beside it.

    torchrun --standalone --nproc-per-node 2 benchmark_ait.py --batch-size N

runs data-parallel: N is the global batch, each process runs N/2 on its own device, and rank 0
appends `batch_size: N, latency: T, devices: 2, qps: Q` (T: the slowest device's median) plus
one line per device (`..., rank: R, local_batch_size: N/2`).
"""

import click

from engine.cli import (deterministic_option, device_option, dtype_option, engine_weights, fail_cleanly,
                        model_option, parse_dtype, resolve_config, run_benchmark, time_budget_option,
                        variant_option, weights_options)


@click.command()
@model_option()
@variant_option("ait")
@click.option("--batch-size", type=click.IntRange(min=0), default=0, show_default=True,
              help="0: the whole sweep; N: only N (under torchrun: the global batch)")
@click.option("--use-fp16-acc", type=bool, default=False, show_default=True,
              help="float16 accumulation in cuBLAS GEMMs (float16 only; no faster on H100)")
@click.option("--use-graph", type=bool, default=None, help="one CUDA graph per batch size (default: on for CUDA, off on ROCm)")
@device_option
@dtype_option()
@weights_options
@click.option("--param-path", type=click.Path(dir_okay=False), default=None, help="engine weight file to use")
@click.option("--exact-gelu", is_flag=True, help="forbid the tanh-approximate GELU GEMM epilogue")
@deterministic_option
@click.option("--output-dir", type=click.Path(file_okay=False), default=".", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default="tmp", show_default=True)
@time_budget_option
@fail_cleanly
def main(model_name, variant, batch_size, use_fp16_acc, use_graph, device, dtype, checkpoint, seed, pretrained,
         param_path, exact_gelu, deterministic, output_dir, cache_dir, time_budget):
    """Benchmark the fused engine."""
    from engine.compile import Options, compile_engine
    from engine.results import check_writable
    from engine.distributed import setup
    from engine.sweep import announce, sweep_sizes
    from modeling.config import describe
    from weight_utils import build_engine

    cfg = resolve_config(model_name, variant)
    group, target = setup(device)
    dt = parse_dtype(dtype, target)
    if group.is_main:  # rank 0 writes the results
        check_writable(output_dir)
    if target.is_gpu:  # where the implementation choices are cached
        check_writable(cache_dir, "cache directory")
    sizes = group.global_sizes(batch_size, sweep_sizes(target))
    group.init(target)
    state, source, _ = engine_weights(cfg, dt, checkpoint, seed, pretrained, param_path)
    say = (lambda m: click.echo(m, err=True)) if group.is_main else (lambda m: None)
    if not target.is_gpu and batch_size == 0:
        say(f"CPU: short sweep {sizes} (about a minute); pass --batch-size N for others")
    say(f"model: {describe(cfg, dt)} on {target.name}; weights: {source}")
    announce(group, sizes, sweep_sizes(target) if batch_size == 0 else sizes, say)
    options = Options(use_graph=use_graph, fp16_acc=use_fp16_acc, exact_gelu=exact_gelu, deterministic=deterministic)
    model = build_engine(cfg, state, dt, target.device)

    def make_runner(batch):
        engine = compile_engine(model, batch, target, options, cache_dir, log=lambda m: click.echo(m, err=True))
        return engine.run, {"plan": engine.plan.as_dict(), "compile_s": engine.info["compile_s"],
                            "plan_s": engine.info.get("plan_s"),
                            "plan_source": engine.info["plan_source"], "use_graph": engine.use_graph,
                            "fp16_acc": use_fp16_acc, "deterministic": options.wants_determinism()}

    run_benchmark("ait", "ait", "ait", cfg, target, dt, sizes, make_runner, output_dir, source, time_budget,
                  group, say)


if __name__ == "__main__":
    main()
