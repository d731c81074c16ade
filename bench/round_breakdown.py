"""Where one default round's time goes on the current code: one node's messages, timed part by part.

    nice -n 10 python bench/round_breakdown.py [--threads N ...]   # writes docs/simulation-speed-breakdown.json

A simulated node is a Ray actor with ``cpus-per-client`` = 1 CPU, and Ray sets ``OMP_NUM_THREADS`` to the
actor's CPUs before it imports torch, so each actor runs torch on 1 thread (``--check-ray`` asks a real Ray
actor). This script replays, in one process, what one node does in a round of the default scenario with the
same functions the ClientApp calls: the partition it would hold (written as ``pollinate simulate`` writes it),
its examples read and split and their token lengths (``client/resident.py`` keeps them), the base model built
(once per run when resident), 40 training steps in batches grouped by length (``train.group-by-length``) split into
tokenisation (``client/data.py`` batches) and forward/backward
(``client/train.py``) and the evaluation of 256 examples in length order. ``bench/simulation_speed.py --render`` puts the
result into ``docs/simulation-speed.md``, beside the measured round time, whose remainder is Flower/Ray's
messaging, scheduling and the server's aggregation and store writes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
OUT = DOCS / "simulation-speed-breakdown.json"


def ray_actor_threads() -> dict[str, object]:
    """torch's thread count inside a real 1-CPU Ray actor, as Flower's simulation creates them."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        class Probe:
            def threads(self) -> dict[str, object]:
                import torch

                return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

        return ray.get(Probe.remote().threads.remote())
    finally:
        ray.shutdown()


def one_node(threads: int) -> dict[str, float]:
    """The parts of one node's round (train + evaluate messages) on ``threads`` torch threads, in seconds."""
    import torch

    from pollinate.client.data import batches, endless_batches, read_examples, split, token_lengths
    from pollinate.client.train import evaluate, train
    from pollinate.models import build_peft_model
    from pollinate.proto.node_config import partition_file
    from pollinate.simulations.cli import write_node_data
    from pollinate.simulations.scenario import DEFAULT_SCENARIO, load_scenario

    torch.set_num_threads(threads)
    cfg, sim = load_scenario(DEFAULT_SCENARIO, {}, None)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="breakdown-") as tmp:
        cfg, _ = write_node_data(cfg, sim, Path(tmp))
        path = partition_file(tmp, 0)
        t = time.perf_counter()
        train_set, eval_set = split(read_examples(path, cfg.data, cfg.model), cfg.data.eval_fraction, cfg.seed)
        read_s = time.perf_counter() - t
    t = time.perf_counter()
    model, base = build_peft_model(cfg)
    build_s = time.perf_counter() - t
    # Tokenisation alone: the node's lengths (once per run, resident) and the batches one round's 40 steps draw,
    # grouped by length as train.group-by-length (default true) has the ClientApp draw them.
    t = time.perf_counter()
    lengths = token_lengths(train_set, base.tokenizer, cfg.model) if cfg.train.group_by_length else None
    lengths_s = time.perf_counter() - t
    stream = endless_batches(train_set, base.tokenizer, cfg.model, cfg.train.batch_size, 1, lengths)
    t = time.perf_counter()
    ready = [next(stream) for _ in range(cfg.train.local_steps)]
    tokenise_s = time.perf_counter() - t
    train(model, iter(ready[:2]), _steps(cfg.train, 2), cpu)  # warm-up: first-call allocations
    t = time.perf_counter()
    train(model, iter(ready), cfg.train, cpu)
    train_s = time.perf_counter() - t
    evaluated = eval_set[: cfg.train.eval_max_examples]
    t = time.perf_counter()
    eval_lengths = token_lengths(evaluated, base.tokenizer, cfg.model)  # in length order, as the ClientApp does
    eval_batches = list(batches(evaluated, base.tokenizer, cfg.model, 64, seed=None, lengths=eval_lengths))
    eval_tokenise_s = time.perf_counter() - t
    t = time.perf_counter()
    evaluate(model, eval_batches, cpu)
    eval_s = time.perf_counter() - t
    return {**padding(train_set, base.tokenizer, cfg), "read_and_split_s": read_s, "model_build_s": build_s, "lengths_once_s": lengths_s,
            "tokenise_train_s": tokenise_s,
            "forward_backward_s": train_s, "tokenise_eval_s": eval_tokenise_s, "eval_forward_s": eval_s,
            "eval_examples": len(evaluated), "train_examples": len(train_set)}


def padding(train_set, tokenizer, cfg) -> dict[str, float]:
    """Real tokens per example against the width a batch is padded to (its longest example), with plain shuffled
    batches and with batches grouped by length: padding's share of the forward/backward, and what grouping cuts."""
    from pollinate.client.data import endless_batches, token_lengths

    lengths = token_lengths(train_set, tokenizer, cfg.model)
    widths = {}
    for name, by_length in (("mean_padded_width", None), ("mean_grouped_width", lengths)):
        stream = endless_batches(train_set, tokenizer, cfg.model, cfg.train.batch_size, 1, by_length)
        widths[name] = statistics.fmean(next(stream)["input_ids"].shape[1] for _ in range(3 * cfg.train.local_steps))
    return {"mean_tokens_per_example": statistics.fmean(lengths), **widths}


def _steps(train_cfg, steps: int):
    import dataclasses

    return dataclasses.replace(train_cfg, local_steps=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads to time one node at")
    parser.add_argument("--check-ray", action="store_true", help="also ask a real 1-CPU Ray actor its torch threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray = ray_actor_threads() if args.check_ray else None
    timed = {n: one_node(n) for n in args.threads}
    for n, parts in timed.items():
        print(f"{n} thread(s): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()), flush=True)
    one = timed[min(timed)]
    parts = {"tokenisation (train + eval batches)": 2 * (one["tokenise_train_s"] + one["tokenise_eval_s"]),
             "forward/backward (40 steps)": 2 * one["forward_backward_s"],
             "evaluation forward (256 examples)": 2 * one["eval_forward_s"]}
    notes = [f"one node, {min(timed)} torch thread: " + ", ".join(f"{k} {v:.2f}" for k, v in one.items()),
             *[f"one node's train + eval compute at {n} torch threads: "
               f"{p['tokenise_train_s'] + p['forward_backward_s'] + p['tokenise_eval_s'] + p['eval_forward_s']:.2f} s"
               for n, p in timed.items()],
             f"padding: a training example has {one['mean_tokens_per_example']:.1f} tokens on average, but a batch "
             f"of {16} is padded to its longest, {one['mean_padded_width']:.1f} tokens on average: "
             f"{1 - one['mean_tokens_per_example'] / one['mean_padded_width']:.0%} of the positions the "
             "forward/backward computes are padding with plain shuffled batches; grouped by length "
             f"(train.group-by-length, the default) a batch is {one['mean_grouped_width']:.1f} tokens wide: "
             f"{1 - one['mean_tokens_per_example'] / one['mean_grouped_width']:.0%} padding",
             "once per run per actor (resident, not per round): model build "
             f"{one['model_build_s']:.2f} s, read + split of the node's examples {one['read_and_split_s']:.2f} s"]
    if ray is not None:
        notes.append(f"a real 1-CPU Ray actor runs torch on {ray['torch_threads']} thread(s) "
                     f"(OMP_NUM_THREADS={ray['OMP_NUM_THREADS']}, set by Ray): no oversubscription to cut")
    method = ("`nice -n 10 python bench/round_breakdown.py --check-ray`: one node's train and evaluate work replayed "
              "in one process with the ClientApp's own functions, timed part by part; a round is 4 nodes on 2 "
              "cores, two at a time, so the node parts count twice.")
    OUT.write_text(json.dumps({"method": method, "parts_s": parts, "notes": notes, "per_threads": timed,
                               "ray_actor": ray}, indent=1) + "\n")
    print(json.dumps(parts, indent=1))


if __name__ == "__main__":
    main()
