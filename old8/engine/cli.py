"""Command-line plumbing the thin scripts share: options, weights, and one-line errors."""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import click
import torch

from . import EngineError

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}
DEFAULT_MODEL = "vit_base_patch16_224"


def model_option(underscore: bool = False):
    names = ("--model_name", "--model-name") if underscore else ("--model-name", "--model_name")
    return click.option(*names, "model_name", default=DEFAULT_MODEL, show_default=True,
                        help="TIMM ViT name")


def variant_option(default: str):
    return click.option("--variant", type=click.Choice(["timm", "ait"]), default=default, show_default=True,
                        help="timm: TIMM's configuration; ait: no class token, average pool "
                             "(what the original example benchmarked)")


def dtype_option(default: Optional[str] = None):
    return click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=default,
                        help="float16 (GPU default), bfloat16, float32 (the CPU's only dtype)")


device_option = click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
                             help="default: the GPU if there is one, else the CPU (with a notice)")


deterministic_option = click.option(
    "--deterministic", is_flag=True,
    help="bitwise-repeatable outputs: no split-K GEMM tiles, whose partial sums land in the GPU's order")


time_budget_option = click.option("--time-budget", type=click.FloatRange(min=0.0, min_open=True), default=2.0,
                                  show_default=True,
                                  help="seconds of timed calls per batch size (after a warm-up of up to 0.5 s)")


def weights_options(fn):
    fn = click.option("--pretrained", type=bool, default=False,
                      help="TIMM's hub weights (needs the local cache or a network)")(fn)
    fn = click.option("--seed", type=int, default=0, show_default=True,
                      help="seed of the random weights (when no checkpoint is given)")(fn)
    fn = click.option("--checkpoint", type=str, default=None,
                      help="local TIMM checkpoint: .safetensors, .pth/.bin state dict, or .npz")(fn)
    return fn


def parse_dtype(name: Optional[str], target=None) -> torch.dtype:
    if name is None:
        return target.default_dtype if target is not None else torch.float16
    dtype = DTYPES[name]
    if target is not None and not target.is_gpu and dtype != torch.float32:
        raise EngineError(f"--dtype {name}: the CPU runs the reference path in float32 only")
    return dtype


def resolve_config(model_name: str, variant: str):
    import modeling  # noqa: F401  (registers the project's test model with TIMM)
    from modeling.config import vit_config
    return vit_config(model_name, variant)


def engine_weights(cfg, dtype, checkpoint=None, seed=0, pretrained=False, param_path=None, need_source_model=False):
    """(engine state, source description, TIMM source model or None).
    With `param_path` the engine weights come from that file; the TIMM model (if asked for)
    still comes from the source weights, so verification compares the file against them."""
    import weight_utils
    source_model = None
    if param_path is None or need_source_model:
        source_model, source = weight_utils.source_model(cfg, checkpoint, seed, pretrained)
    if param_path is not None:
        state, source = weight_utils.load_engine_weights(param_path, cfg, dtype)
    else:
        state = weight_utils.convert(source_model, cfg)
    return state, source, source_model


def fail_cleanly(fn):
    """Turn the errors a user can cause into one line on stderr and a non-zero exit."""
    from modeling.config import UnsupportedModel
    from weight_utils import WeightError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (EngineError, WeightError, UnsupportedModel) as err:
            _die(str(err))
        except torch.cuda.OutOfMemoryError:
            _die("the GPU ran out of memory; try a smaller --batch-size")
        except KeyboardInterrupt:
            _die("interrupted", code=130)
        except OSError as err:
            _die(f"{err.filename or ''}: {err.strerror or err}".lstrip(": "))
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as err:
            if os.environ.get("VIT_DEBUG"):
                raise
            _die(f"internal error: {type(err).__name__}: {' '.join(str(err).split())[:300]} "
                 f"(VIT_DEBUG=1 shows the traceback)")
    return wrapper


def _die(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def run_benchmark(engine: str, mode: str, results_name: str, cfg, target, dtype, sizes, make_runner,
                  output_dir, source, time_budget, group, say):
    """The end every benchmark script shares: sweep, write results, say where, exit 3 if partial."""
    from .results import results_stem
    from .sweep import run_sweep, timing_for
    from .target import visible_devices_flag
    stem = results_stem(cfg.model_name, results_name, visible_devices_flag(target))
    complete = run_sweep(engine, mode, cfg, target, dtype, sizes, make_runner, output_dir, stem, str(source),
                         log=lambda m: click.echo(m, err=True), timing_kwargs=timing_for(time_budget), group=group)
    group.shutdown()
    if group.is_main:
        click.echo(f"results: {stem}.txt, {stem}.json in {output_dir}")
    if not complete:
        say("error: the sweep was partial (some batch sizes ran out of memory)")
        sys.exit(3)
