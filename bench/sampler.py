"""The sampler benchmark: plain, prefix and dual cache, each without and with threshold decoding.

One table of generate.py's modes: (a) speed on a random ~60M model at d1's rollout shape, and (b) held-out
accuracy and the share of tokens identical to the plain sampler's on each trained tiny_sudoku checkpoint.

    python -m bench.sampler                                # from the repository root: (a) only
    python -m bench.sampler --model out/sft out/grpo       # (a), then (b) on the models of run_tiny.sh
"""

import argparse
import os
import time

import torch

import checkpoint as C
import data
import evaluate
from generate import CACHE_MODES, forward_passes_per_token, generate

BENCH_THRESHOLD = 0.9  # Fast-dLLM's tau
# (a) speed at d1's rollout shape: batch, prompt length, gen_length, block_length, steps, temperature
# (batch 4, under d1's 6 rollouts per device, keeps the CPU run short)
BENCH_SPEED_SHAPE = (4, 200, 256, 32, 128, 0.9)
# (b) quality on a trained tiny_sudoku model, greedy, with several blocks per completion so that stale
# caches can matter (the answer is 19 characters + EOS)
BENCH_QUALITY_SHAPE = {"gen_length": 20, "block_length": 5, "steps": 20, "batch_size": 250}
BENCH_MODES = [(cache, threshold) for threshold in (None, BENCH_THRESHOLD) for cache in CACHE_MODES]


def mode_name(cache, threshold):
    """The sampler column's name of a mode: plain, prefix or dual, with its threshold if any."""
    name = "plain" if cache == "none" else cache
    return name if threshold is None else f"{name} + threshold {threshold}"


def same_token_share(tokenizer, texts, reference_texts, canvases, mask_id):
    """The share of sampled token positions where two lists of completions agree: positions up to the
    longer completion of each pair, less the given tokens of its canvas (canvases: lists of ids, [MASK]
    where the sampler fills in, or None)."""
    same = total = 0
    for text, reference, canvas in zip(texts, reference_texts, canvases):
        a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (text, reference))
        for j in range(max(len(a), len(b))):
            if canvas is None or j >= len(canvas) or canvas[j] == mask_id:
                same += j < min(len(a), len(b)) and a[j] == b[j]
                total += 1
    return same / max(total, 1)


@torch.no_grad()  # a context, not a global switch: tests call bench in process
def bench(model_paths):
    """Prints one table: plain, prefix and dual cache, each without and with threshold decoding, on
    (a) a random ~60M model at d1's rollout shape (speed) and (b) each trained tiny_sudoku checkpoint of
    model_paths (held-out accuracy and tokens identical to the plain sampler's)."""
    header = (f"{'workload':<30} {'sampler':<24} {'tok/s':>8} {'x plain':>8} {'fwd/token':>9} "
              f"{'accuracy':>8} {'same tokens':>11}")
    print(header + "\n" + "-" * len(header), flush=True)

    B, Lp, gen_length, block_length, steps, temperature = BENCH_SPEED_SHAPE
    model = C.build_model("bench-60m").eval()
    workload = f"(a) bench-60m random B{B} {Lp}+{gen_length}"
    prompt = torch.randint(0, model.cfg.vocab_size - 2, (B, Lp), generator=torch.Generator().manual_seed(0))
    model(prompt)  # warm-up
    plain = None
    for cache, threshold in BENCH_MODES:
        stats = {}
        t0 = time.perf_counter()
        generate(model, prompt, steps, gen_length, block_length, temperature, mask_id=model.cfg.mask_token_id,
                 generator=torch.Generator().manual_seed(0), cache=cache, threshold=threshold, stats=stats)
        tokens_per_s = B * gen_length / (time.perf_counter() - t0)
        plain = plain or tokens_per_s
        print(f"{workload:<30} {mode_name(cache, threshold):<24} {tokens_per_s:>8.1f} "
              f"{tokens_per_s / plain:>8.2f} {forward_passes_per_token(stats):>9.3f} {'-':>8} {'-':>11}",
              flush=True)

    if not model_paths:
        print("(b) skipped: pass --model DIR [DIR ...], trained tiny_sudoku checkpoints "
              "(e.g. out/sft out/grpo)")
        return
    examples = data.test_examples("tiny_sudoku", "data/files")
    q = BENCH_QUALITY_SHAPE
    for path in model_paths:
        bench_quality(path, examples)
    print(f"(a) {steps} steps in blocks of {block_length}, temperature {temperature}; (b) gen_length "
          f"{q['gen_length']}, blocks of {q['block_length']}, {q['steps']} steps, greedy, batch "
          f"{q['batch_size']}; fwd/token: forward passes x rows / generated tokens")


def bench_quality(path, examples):
    """The benchmark's workload (b) on one trained tiny_sudoku checkpoint: a row per sampler mode."""
    model, tokenizer = C.load_model(path).eval(), C.load_tokenizer(path)
    q = BENCH_QUALITY_SHAPE
    workload = f"(b) {os.path.basename(os.path.normpath(path))} {len(examples)} held-out"
    canvases = [data.encode_canvas(tokenizer, e, q["gen_length"], model.cfg.mask_token_id) for e in examples]
    reference = None
    for cache, threshold in BENCH_MODES:
        result = evaluate.evaluate_examples(model, tokenizer, "tiny_sudoku", examples, progress=False,
                                            cache=cache, threshold=threshold, **q)
        reference = reference or result
        same = same_token_share(tokenizer, result["completions"], reference["completions"], canvases,
                                model.cfg.mask_token_id)
        print(f"{workload:<30} {mode_name(cache, threshold):<24} {result['tokens_per_s']:>8.1f} "
              f"{result['tokens_per_s'] / reference['tokens_per_s']:>8.2f} "
              f"{result['forward_passes_per_token']:>9.3f} {100 * result['accuracy']:>7.1f}% "
              f"{100 * same:>10.1f}%",
              flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.sampler", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=[], metavar="DIR",
                        help="trained tiny_sudoku checkpoints for the quality workload (b), one part of the "
                             "table each; without it, (b) is skipped")
    args = parser.parse_args()
    for path in args.model:
        if not os.path.isdir(path):
            parser.error(f"--model {path!r}: checkpoint folders")
    bench(args.model)
