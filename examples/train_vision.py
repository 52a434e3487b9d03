"""A small Data2VecVision classifier trained from scratch on scikit-learn's handwritten digits.

    python examples/train_vision.py [--output examples/out/vision-digits] [--seed 0] [--quick]
    d2v-export vision --model examples/out/vision-digits --int8 \
        --calibration examples/out/vision-digits/calibration --eval examples/out/vision-digits/eval

Data: `sklearn.datasets.load_digits()` (1,797 real 8x8 scans of handwritten digits, 16 grey levels;
UCI "Optical Recognition of Handwritten Digits", BSD-3-Clause with scikit-learn). Each digit is
rendered once as a PIL image (white ink on black, 8x8 -> --image-size with bicubic resampling, RGB)
and every split goes through the checkpoint's own BeitImageProcessor, so training, the saved PNGs
and d2v-export see identical pixels. Split per class with the seed: eval 30, calibration 10,
train the rest (about 140 a class).

Model: the structure of facebook/data2vec-vision-base-ft1k (relative position bias per layer, mean
pooling, layer scale), shrunk: 6 layers, 192 wide, 3 heads, 32x32 input, 8x8 patches (16 patches).
Training: AdamW, warmup + cosine, 15 epochs of batch 32 (optional random shifts: --shift).

Output: checkpoint (model.safetensors, config.json with id2label "0".."9", preprocessor_config.json),
`eval/<label>/*.png` and `calibration/<label>/*.png` (folder-per-class: d2v-export's image reader
takes the label from the parent folder's name), and training.json.
"""

from __future__ import annotations

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

LABELS = tuple(str(d) for d in range(10))


def render(digits: np.ndarray, size: int) -> list[Any]:
    """(n, 8, 8) values 0..16 -> RGB PIL images of size x size."""
    from PIL import Image

    out = []
    for d in digits:
        small = Image.fromarray(np.rint(d * (255.0 / 16.0)).astype(np.uint8), "L")
        out.append(small.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"))
    return out


def splits(seed: int, n_eval: int, n_calib: int, n_train: int | None) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    y = load_digits().target
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "eval": [], "calibration": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        out["eval"] += idx[:n_eval].tolist()
        out["calibration"] += idx[n_eval : n_eval + n_calib].tolist()
        out["train"] += idx[n_eval + n_calib :][:n_train].tolist()
    return {k: np.array(sorted(v)) for k, v in out.items()}


def build(image_size: int, patch: int, hidden: int, layers: int, heads: int, drop_path: float = 0.1) -> tuple[Any, Any]:
    import transformers

    from d2v_export.heads import head_for
    from d2v_export.models import preset_processors
    from d2v_export.spec import Modality

    config = transformers.Data2VecVisionConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=image_size,
        patch_size=patch,
        num_channels=3,
        use_relative_position_bias=True,
        use_shared_relative_position_bias=False,
        use_absolute_position_embeddings=False,
        use_mean_pooling=True,
        layer_scale_init_value=0.1,
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=drop_path,
        use_auxiliary_head=True,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    model = transformers.Data2VecVisionForImageClassification(config)
    processor, _ = preset_processors(Modality.VISION, config, head_for(Modality.VISION, "image-classification"))
    return model, processor


def pixels(processor: Any, images: list[Any]) -> Any:
    import torch

    return torch.from_numpy(np.asarray(processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32))


def shifted(x: Any, rng: np.random.Generator, shift: int) -> Any:
    """Each image moved by up to `shift` pixels, the gap filled with the background (-1 = black)."""
    import torch

    if shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift), value=-1.0)
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def accuracy(model: Any, x: Any, y: Any, batch: int = 128) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(pixel_values=x[i : i + batch]).logits.argmax(-1) for i in range(0, len(x), batch)])
    return int((pred == y).sum()) / len(y)  # exact ratio: compared with d2v-export's count below


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch
    from sklearn.datasets import load_digits

    p = parser(__doc__.splitlines()[0], "vision-digits")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument(
        "--drop-path", type=float, default=0.1, help="stochastic depth rate (the real checkpoints train with 0.1)"
    )
    p.add_argument(
        "--shift",
        type=int,
        default=0,
        help="random translation in pixels (the digits come centred; shifts slow training down)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 1
    seed_everything(args.seed, args.threads)
    timer = Timer()

    digits = load_digits()
    split = splits(args.seed, 2 if args.quick else 30, 1 if args.quick else 10, 4 if args.quick else None)
    images = render(digits.images, args.image_size)
    model, processor = build(args.image_size, args.patch, args.hidden, args.layers, args.heads, args.drop_path)
    x = {k: pixels(processor, [images[i] for i in v]) for k, v in split.items()}
    y = {k: torch.from_numpy(digits.target[v]).long() for k, v in split.items()}
    log(
        f"digits: train {len(y['train'])}, eval {len(y['eval'])}, calibration {len(y['calibration'])}; "
        f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters"
    )

    rng = np.random.default_rng(args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = -(-len(y["train"]) // args.batch)
    total = 2 if args.quick else args.epochs * steps_per_epoch
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, total - warm)))
    )
    step = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(y["train"])))
        losses = []
        for i in range(0, len(order), args.batch):
            if step >= total:
                break
            idx = order[i : i + args.batch]
            out = model(pixel_values=shifted(x["train"][idx], rng, args.shift), labels=y["train"][idx])
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(out.loss.item())
            step += 1
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            log(
                f"epoch {epoch + 1}/{args.epochs}: loss {np.mean(losses):.4f}, held-out acc {accuracy(model, x['eval'], y['eval']):.4f} ({timer()} s)"
            )
    train_s = timer()
    acc = accuracy(model, x["eval"], y["eval"])
    train_acc = accuracy(model, x["train"], y["train"])
    log(f"held-out accuracy {acc:.4f} (train {train_acc:.4f})")

    out = fresh_dir(args.output)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    for name in ("eval", "calibration"):
        for i in split[name]:
            folder = out / name / LABELS[digits.target[i]]
            folder.mkdir(parents=True, exist_ok=True)
            images[i].save(folder / f"digit_{i:04d}.png", optimize=False)

    loaded = check_loads(out, "vision")
    via_tool, n = reader_accuracy(loaded, out / "eval")
    log(f"saved checkpoint read back by d2v-export: {n} eval images, accuracy {via_tool:.4f}")
    if abs(via_tool - acc) > 1e-9:
        raise SystemExit(f"d2v-export's reader gives accuracy {via_tool:.4f}, training saw {acc:.4f}")
    meta = {
        "task": "image-classification",
        "labels": list(LABELS),
        "heldout_accuracy": acc,
        "train_accuracy": train_acc,
        "splits": {k: len(v) for k, v in split.items()},
        "train_steps": step,
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "quick": args.quick,
        "architecture": {k: getattr(args, k) for k in ("image_size", "patch", "hidden", "layers", "heads")},
        "parameters": int(sum(q.numel() for q in model.parameters())),
        "train_seconds": train_s,
        "total_seconds": timer(),
        "data": "scikit-learn load_digits (UCI optical digits, BSD-3-Clause), upsampled bicubic, white on black",
    }
    write_meta(out, meta)
    meta["checkpoint_bytes"] = folder_size(out)
    log(f"saved {out} ({meta['checkpoint_bytes'] / 1e6:.1f} MB) in {meta['total_seconds']} s")
    return meta


if __name__ == "__main__":
    main()
