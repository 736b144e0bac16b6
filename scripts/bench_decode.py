#!/usr/bin/env python
"""The rollout's decode step against the machine's matmul ceiling: how much of a decode step is useful arithmetic.

    .venv/bin/python scripts/bench_decode.py [--model embedded] [--rows 16] [--prompt_tokens 165] \
        [--engine hf static compiled]

For each engine it times `grpo_ds.generation.generate` on `rows` rows (groups of 8 sharing a prompt, EOS suppressed)
at two completion budgets and takes the difference, so prefill and set-up cancel: seconds per decode step. A decode
step's arithmetic is 2 x rows x (the parameters of every linear layer, the output head included) FLOPs plus the
attention over the cache (2 x 2 x rows x layers x cached tokens x hidden, at the mean cache length); its rate is
compared with two ceilings measured here, in fp32 with the same threads:

- `peak`: a large square matmul (2048^3), the most this CPU's BLAS does;
- `same shapes`: the decode step's own matmuls (rows x in_features @ in_features x out_features for every linear
  layer of the model, timed alone, back to back), the most a decode step of this width could do with its weights
  in the caches;
- `floor`: what any engine that draws `generate`'s tokens pays per step: every linear layer with the model's own
  weights, one after another (each weight read from memory once per step, as in decoding), plus the random
  numbers of torch's multinomial draw (one exponential per row and vocabulary entry, drawn serially).

`fraction of same-shape ceiling` = the same-shape matmuls' time / the measured decode step: what is left is
overhead (Python, attention, cache updates, sampling). `generate s` is the whole call at the longer budget (prefill
included), to set beside a training run's rollout phase. Prints a table and writes JSON (--json).
"""

import argparse
import json
import time

import torch

from grpo_ds.generation import Sampling, StaticDecoder, generate
from grpo_ds.models import load_model, load_tokenizer, resolve_model


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_s(m: int, k: int, n: int, repeats: int = 20) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    return median_time(lambda: torch.mm(a, b), repeats)


def linear_weights(model) -> list[torch.Tensor]:
    """The weight of every linear layer a decode step runs, the output head included, each once."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    if head is not None and not any(w is head.weight for w in weights):
        weights.append(head.weight)
    return weights


def floor_s(model, rows: int, repeats: int = 5) -> tuple[float, float]:
    """(the linear layers with their own weights, back to back; the multinomial draw's random numbers), seconds."""
    weights = linear_weights(model)
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}

    def linears():
        with torch.no_grad():
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

    linears()
    noise = torch.empty(rows, model.config.vocab_size)
    return median_time(linears, repeats), median_time(noise.exponential_, repeats)


def linear_shapes(model) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer a decode step runs, the output head included."""
    return [(w.shape[1], w.shape[0]) for w in linear_weights(model)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--rows", type=int, default=16, help="rows decoded together (groups of --group_size)")
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=165, help="prompt length (GSM8K prompts average ~165)")
    parser.add_argument("--tokens", type=int, nargs=2, default=[32, 96], help="the two completion budgets")
    parser.add_argument("--engine", nargs="+", default=["hf", "static"], choices=["hf", "static", "compiled"],
                        help="hf: transformers' generate; static: the static engine as a CPU runs it (eager); "
                             "compiled: the static engine under torch.compile, as a GPU runs it (warmed up at both "
                             "budgets first, so compile time is left out; its compiles are reported)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    path = resolve_model(args.model)
    model = load_model(path, torch.float32).eval()
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    config = model.config
    num_prompts = args.rows // args.group_size
    low = min(100, config.vocab_size // 4)  # away from the special tokens at either end
    prompts = [torch.randint(low, config.vocab_size - low, (args.prompt_tokens,)).tolist() for _ in range(num_prompts)]

    flop_linear = 2 * args.rows * sum(i * o for i, o in linear_shapes(model))
    mean_cache = args.prompt_tokens + sum(args.tokens) / 2
    flop_attention = 4 * args.rows * config.num_hidden_layers * mean_cache * config.hidden_size
    flop_step = flop_linear + flop_attention
    peak_flops = 2 * 2048 ** 3 / matmul_s(2048, 2048, 2048, repeats=5)
    same_shape_s = sum(matmul_s(args.rows, i, o) for i, o in linear_shapes(model))
    streamed_s, draw_s = floor_s(model, args.rows)

    results = {"model": args.model, "rows": args.rows, "prompt_tokens": args.prompt_tokens, "threads":
               torch.get_num_threads(), "gflop_per_step": flop_step / 1e9, "peak_gflops": peak_flops / 1e9,
               "same_shape_matmul_s": same_shape_s, "streamed_linear_s": streamed_s, "multinomial_noise_s": draw_s,
               "engines": {}}
    for name in args.engine:
        engine = StaticDecoder(model, compile=name == "compiled") if name != "hf" else None

        def run(budget: int):
            sampling = Sampling(budget, temperature=1.0, top_p=1.0, fixed_length=True)
            with torch.no_grad():
                generate(model, tokenizer, prompts, sampling, group_size=args.group_size, engine=engine)

        for budget in args.tokens if name == "compiled" else args.tokens[:1]:  # warm-up (and every compile)
            run(budget)
        short, long = (median_time(lambda b=b: run(b), args.repeats) for b in args.tokens)
        step_s = (long - short) / (args.tokens[1] - args.tokens[0])
        results["engines"][name] = {
            "generate_s": long, "decode_step_ms": step_s * 1e3, "tokens_per_s": args.rows / step_s,
            "gflops": flop_step / step_s / 1e9,
            "fraction_of_peak": flop_step / step_s / peak_flops,
            "fraction_of_same_shape_ceiling": same_shape_s / step_s,
            "fraction_of_floor": (streamed_s + draw_s) / step_s,
            "engine_compiles": engine.compiles if engine is not None else 0}

    print(f"{args.model}: {args.rows} rows, prompt {args.prompt_tokens} tokens, {results['threads']} threads, "
          f"{results['gflop_per_step']:.2f} GFLOP per decode step; fp32 matmul peak {results['peak_gflops']:.1f} "
          f"GFLOP/s, the step's own matmuls alone {same_shape_s * 1e3:.1f} ms; "
          f"floor {(streamed_s + draw_s) * 1e3:.1f} ms "
          f"(its linear layers with their own weights {streamed_s * 1e3:.1f} ms, the multinomial draw's random "
          f"numbers {draw_s * 1e3:.1f} ms)")
    print(f"{'engine':8} {'step ms':>8} {'tok/s':>7} {'GFLOP/s':>8} {'of peak':>8} {'of same-shape':>14} "
          f"{'of floor':>9} {'compiles':>8} {'generate s (' + str(args.tokens[1]) + ' tokens)':>22}")
    for name, r in results["engines"].items():
        print(f"{name:8} {r['decode_step_ms']:8.1f} {r['tokens_per_s']:7.0f} {r['gflops']:8.1f} "
              f"{r['fraction_of_peak']:8.0%} {r['fraction_of_same_shape_ceiling']:14.0%} "
              f"{r['fraction_of_floor']:9.0%} {r['engine_compiles']:8d} "
              f"{r['generate_s']:22.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
