"""
grpo.py's log-likelihood estimators side by side, on a trained model and one fixed batch of rollouts.

The likelihood of a masked diffusion LM is intractable; what it is trained on, and what RL on it can aim
at, is LLaDA's evidence lower bound. The reference is that bound by Monte Carlo with many draws, in the
lower-variance form LLaDA evaluates likelihoods with (Nie et al. 2025): of a completion's L action tokens,
l ~ U{1..L} are masked uniformly at random, the prompt and the canvas stay visible, and
    ELBO(o | q) = E_l [ (L / l) sum_{i masked} log p(o_i | x_l) ].
For each estimator (grpo.py --estimator), R mask draws of the per-sequence estimate log pi(o | q), the sum
over the action tokens, give:
  bias     the mean over draws minus the reference, averaged over sequences (and its mean absolute value);
  std      the standard deviation over draws, averaged over the sequences;
  grad var the variance of the policy gradient over draws, E||g - mean g||^2 / ||mean g||^2, for the surrogate
           sum_i A_i log pi(o_i | q) / tokens (d1's objective at its first iteration, ratio 1, beta 0);
  cos      the cosine between the estimator's mean gradient and the reference's (the ELBO's) gradient;
  ms       the time of one estimate with its backward pass (2 forward rows per sequence for coupled).
Then the forward passes per rollout batch that grpo.py runs for each estimator x objective.

    python sft.py && python -m bench.estimators           # the tiny default's SFT checkpoint, out/sft
    python -m bench.estimators --model DIR --draws 64 --reference-draws 1024
"""

import argparse
import time

import torch

import checkpoint as C
import data
import grpo
import model as M
import rewards

parser = argparse.ArgumentParser(
    description="Bias, variance and cost of grpo.py's log-likelihood estimators.")
parser.add_argument("--model", default="out/sft", help="a trained checkpoint folder (sft.py's --out-dir)")
parser.add_argument("--task", default="tiny_sudoku", choices=data.TASKS, help="prompts and rewards")
parser.add_argument("--data-dir", default="data/files", help="where downloaded datasets live")
parser.add_argument("--prompts", type=int, default=8, help="prompts in the fixed rollout batch")
parser.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt")
parser.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (grpo.py's default)")
parser.add_argument("--p-mask-prompt", type=float, default=0.15, help="prompt masking rate of the estimators")
parser.add_argument("--draws", type=int, default=32, help="mask draws per estimator")
parser.add_argument("--reference-draws", type=int, default=512,
                    help="Monte-Carlo draws of the reference ELBO")
parser.add_argument("--num-iterations", type=int, default=4,
                    help="mu, for the forward-pass count (grpo.py's default)")
parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient, for the forward-pass count")
parser.add_argument("--seed", type=int, default=0, help="seed of the prompts, rollouts and masks")
args = parser.parse_args()
STUDIED = ("d1", "coupled")  # the estimators of one (N, T) estimate that read nothing else of the rollout
torch.manual_seed(args.seed)

# -----------------------------------------------------------------------------
# The model and one fixed batch of rollouts (grpo.py's rollouts at its first step, on one process)

tokenizer = C.load_tokenizer(args.model)
model = C.load_model(args.model).eval()
mask_id = C.mask_token_id(tokenizer)
defaults = data.generation_defaults(args.task)
gen_length = defaults["gen_length"]
split = "rl" if args.task in data.TINY_TASKS else "train"
prompts = data.load_examples(args.task, split, data_dir=args.data_dir, seed=args.seed)
records = [prompts[i] for i in data.step_indices(0, args.prompts, len(prompts), args.seed)]
sampler = {"steps": defaults["steps"], "gen_length": gen_length,
           "block_length": min(defaults["block_length"], gen_length), "temperature": args.temperature,
           "cache": "none", "threshold": None}
sequences, attention_mask, canvas, actions, texts = grpo.rollout(
    model, tokenizer, records, sampler, num_generations=args.num_generations, mask_id=mask_id, device="cpu",
    noise_seed=(args.seed,))  # one batch: its noise from data.generator(seed, 0)
N, prompt_length = sequences.shape[0], sequences.shape[1] - gen_length
targets = sequences[:, prompt_length:]
is_prompt = grpo.conditioning_mask(sequences, prompt_length, canvas, mask_id)
reward, _ = grpo.score_completions(rewards.reward_functions(args.task), texts, records, args.num_generations)
advantages = grpo.group_advantages(reward, args.num_generations).reshape(-1)  # (N,)
print(f"{N} rollouts ({args.prompts} prompts x G={args.num_generations}) from {args.model}: mean reward "
      f"{reward.mean():.3f}, {actions.sum(dim=1).float().mean():.1f} action tokens per completion")

# -----------------------------------------------------------------------------
# Per-token estimates (N, T): each estimator as grpo.py reads it, and one draw of the reference


def estimate(estimator, seed):
    make_input, logprobs, _ = grpo.ESTIMATORS[estimator](args, sampler)
    estimated = make_input(sequences, is_prompt, args.p_mask_prompt, mask_id,
                           torch.Generator().manual_seed(seed))
    return logprobs(model, estimated, slice(None), sequences, attention_mask, prompt_length)


def reference(seed):
    """One draw of LLaDA's ELBO: l ~ U{1..L} of each sequence's L actions masked, weighted L / l."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(targets.shape, generator=g).masked_fill(~actions, 2.0)  # non-actions sort last
    order = u.argsort(dim=1).argsort(dim=1)  # each token's rank among its row's actions
    num_actions = actions.sum(dim=1, keepdim=True).clamp(min=1)
    num_masked = 1 + (torch.rand((N, 1), generator=g) * num_actions).long().clamp(max=num_actions - 1)
    masked = actions & (order < num_masked)
    noisy = sequences.clone()
    noisy[:, prompt_length:] = torch.where(masked, mask_id, targets)
    logp = M.token_logprobs(model(noisy, attention_mask, slice(prompt_length, None)), targets)
    return logp * masked * (num_actions / num_masked)


def sequence_logp(per_token):
    return (per_token * actions).sum(dim=1)  # (N,)


def gradient(per_token):
    """The policy gradient of sum_i A_i log pi(o_i | q) / tokens, flattened."""
    surrogate = (advantages * sequence_logp(per_token)).sum() / actions.sum()
    grads = torch.autograd.grad(surrogate, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


# -----------------------------------------------------------------------------
# The reference and each estimator's statistics

with torch.no_grad():
    reference_draws = torch.stack([sequence_logp(reference(10**6 + r)) for r in range(args.reference_draws)])
reference_logp = reference_draws.mean(dim=0)  # (N,)
reference_error = (reference_draws.std(dim=0) / args.reference_draws ** 0.5).mean().item()
# the reference gradient from a quarter of the draws, in two independent halves
halves = [torch.stack([gradient(reference(2 * 10**6 + r))
                       for r in range(h, args.reference_draws // 4, 2)]).mean(dim=0)
          for h in range(2)]
reference_gradient = (halves[0] + halves[1]) / 2
cosine = torch.nn.functional.cosine_similarity
print(f"reference ELBO: {args.reference_draws} draws, mean log-likelihood {reference_logp.mean():.3f}, "
      f"standard error {reference_error:.4f} per sequence; its gradient from {args.reference_draws // 4} "
      f"draws, cosine between halves {cosine(halves[0], halves[1], dim=0):.3f}")

rows = []
for estimator in STUDIED:
    values, grads, seconds = [], [], 0.0
    for r in range(args.draws):
        t0 = time.time()
        per_token = estimate(estimator, r)
        grads.append(gradient(per_token))
        seconds += time.time() - t0
        values.append(sequence_logp(per_token).detach())
    values, grads = torch.stack(values), torch.stack(grads)  # (R, N), (R, P)
    bias = values.mean(dim=0) - reference_logp
    mean_gradient = grads.mean(dim=0)
    rows.append([estimator, f"{bias.mean():+.3f}", f"{bias.abs().mean():.3f}",
                 f"{values.std(dim=0).mean():.3f}",
                 f"{(grads - mean_gradient).pow(2).sum(dim=1).mean() / mean_gradient.pow(2).sum():.3f}",
                 f"{cosine(mean_gradient, reference_gradient, dim=0):.3f}",
                 f"{1000 * seconds / args.draws:.0f}"])

header = ["estimator", "bias", "|bias|", "std", "grad var", "cos", "ms"]
print(f"\nper-sequence log-likelihood against the reference ELBO, {args.draws} mask draws, "
      f"p_mask_prompt {args.p_mask_prompt}")
print(" | ".join(f"{h:>9}" for h in header))
for row in rows:
    print(" | ".join(f"{v:>9}" for v in row))

mu, reference_passes = args.num_iterations, args.num_iterations if args.beta > 0 else 0
old_passes = mu if mu > 1 else 0
print(f"\nforward passes over the {N} rollouts per rollout batch (mu {mu}, beta {args.beta}): "
      "old, reference and current for grpo, the current alone for wd1; "
      "coupled reads two passes where d1 reads one")
for estimator, passes in ((name, grpo.ESTIMATORS[name](args, sampler)[2]) for name in STUDIED):
    print(f"  {estimator:>7} + grpo: {passes * (old_passes + reference_passes + mu):3d} "
          f"({passes * mu} with backward) | {estimator:>7} + wd1: {passes * mu:3d} "
          f"({passes * mu} with backward)")
