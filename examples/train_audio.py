"""A small Data2VecAudio classifier of spoken letters: real recordings plus synthesized voices.

    python examples/train_audio.py [--output examples/out/audio-letters] [--seed 0] [--quick]
    d2v-export audio --model examples/out/audio-letters --int8 \
        --calibration examples/out/audio-letters/calibration --eval examples/out/audio-letters/eval

Classes: the spoken names of ten letters, A F H L O Q R W X Y (no rhymes such as B/D/E/P).

Data (all offline, Debian packages):
- real recordings: `klettres-data` (KDE KLettres, GPL-2.0-or-later), one speaker in
  /usr/share/klettres/en/alpha and another in /usr/share/klettres/en_GB/alpha, 44.1 kHz Ogg;
- synthesized: `espeak-ng` (8 English accents x ~90 voice variants, random speed and pitch) and
  `flite` (voices kal, kal16, awb, rms, slt, random duration and f0).
Every clip is brought to 16 kHz mono, silence-trimmed, placed in a 1.0 s window and quantized to
16-bit, exactly what the saved WAV files hold.

Split by voice, never by clip: evaluation holds the en_GB KLettres speaker, flite's slt and five
espeak variants no training clip uses; calibration holds flite's kal16 (the kal speaker at 16 kHz)
and three other espeak variants; training gets the en KLettres speaker (speed-perturbed copies),
flite kal/awb/rms and the remaining espeak variants. Training adds random placement in the window,
gain and noise.

Model: the data2vec-audio structure (7-layer conv feature encoder with layer norm, 5-layer
positional convolution, post-LN transformer, mean pooling), shrunk to conv widths 32-64, hidden 128,
4 layers. A CTC model is not trained: a one-letter "transcript" is this classifier in disguise,
and a real CTC model does not train to a usable CER in minutes on 2 cores.

Output: checkpoint (model.safetensors, config.json with id2label, preprocessor_config.json for
Wav2Vec2FeatureExtractor), `eval/<label>/*.wav` and `calibration/<label>/*.wav` with a
`labels.tsv` (`file<TAB>label`) in each root, since d2v-export's audio reader takes labels from
labels.tsv only (not from folder names), and training.json.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from math import gcd
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

LETTERS = ("A", "F", "H", "L", "O", "Q", "R", "W", "X", "Y")
RATE = 16_000
WINDOW = RATE  # 1.0 s
KLETTRES = Path("/usr/share/klettres")
ESPEAK_VARIANTS = Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
ODD = {"whisper", "whisperf", "croak", "Demonic", "UniRobot", "anikaRobot", "Tweaky", "kaukovalta"}  # not speech-like
FLITE = {"train": ("kal", "awb", "rms"), "calibration": ("kal16",), "eval": ("slt",)}  # kal16 = kal's speaker


# --------------------------------------------------------------------------- audio helpers


def resample(x: np.ndarray, rate: int, to: int = RATE) -> np.ndarray:
    from scipy.signal import resample_poly

    if rate == to:
        return x.astype(np.float64)
    g = gcd(int(to), int(rate))
    return resample_poly(x.astype(np.float64), to // g, rate // g)


def read(path: Path) -> np.ndarray:
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    return resample(data.mean(axis=1), rate)


def trim(x: np.ndarray, margin: float = 0.05) -> np.ndarray:
    """Cut leading/trailing silence (10 ms frames under 3 % of the loudest frame's RMS), keep a margin; peak 0.9."""
    frame = RATE // 100
    n = len(x) // frame
    if n == 0:
        return x
    rms = np.sqrt((x[: n * frame].reshape(n, frame) ** 2).mean(1))
    loud = np.flatnonzero(rms > 0.03 * rms.max())
    pad = int(margin * RATE)
    x = x[max(0, loud[0] * frame - pad) : min(len(x), (loud[-1] + 1) * frame + pad)]
    x = x[:WINDOW] if len(x) <= WINDOW else x[(len(x) - WINDOW) // 2 :][:WINDOW]
    return 0.9 * x / max(1e-9, float(np.abs(x).max()))


def place(x: np.ndarray, offset: int | None = None) -> np.ndarray:
    """Put a trimmed clip into the 1.0 s window (centred unless an offset is given)."""
    out = np.zeros(WINDOW, dtype=np.float64)
    room = WINDOW - len(x)
    start = room // 2 if offset is None else min(max(0, offset), room)
    out[start : start + len(x)] = x
    return out


def pcm16(x: np.ndarray) -> np.ndarray:
    """What a 16-bit WAV file stores, read back as float (soundfile's scaling)."""
    return (np.clip(np.rint(x * 32767.0), -32768, 32767) / 32768.0).astype(np.float32)


def speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Speed perturbation (tempo and pitch together) by resampling."""
    num = round(100 / factor)
    return resample(x, 100, num) if num != 100 else x


# --------------------------------------------------------------------------- sources


def espeak(text: str, voice: str, wpm: int, pitch: int, tmp: Path) -> np.ndarray:
    path = tmp / "espeak.wav"
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "-w", str(path), text],
        check=True,
        capture_output=True,
    )
    return read(path)


def flite(text: str, voice: str, stretch: float, f0: int, tmp: Path) -> np.ndarray:
    path = tmp / "flite.wav"
    cmd = [
        "flite",
        "-voice",
        voice,
        "--setf",
        f"duration_stretch={stretch:.2f}",
        "--setf",
        f"int_f0_target_mean={f0}",
        "-t",
        text,
        "-o",
        str(path),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return read(path)


def klettres(speaker: str, letter: str) -> np.ndarray:
    name = letter if speaker == "en" else letter.lower()
    return read(KLETTRES / speaker / "alpha" / f"{name}.ogg")


def variant_split(rng: np.random.Generator) -> dict[str, list[str]]:
    names = sorted(p.name for p in ESPEAK_VARIANTS.iterdir() if p.is_file() and p.name not in ODD)
    plain = [n for n in names if re.fullmatch(r"m\d|f\d|klatt\d?", n)]
    held = [plain[i] for i in rng.permutation(len(plain))]
    return {"eval": sorted(held[:5]), "calibration": sorted(held[5:8]), "train": sorted(set(names) - set(held[:8]))}


def build_clips(
    seed: int, per_class: dict[str, int], flite_settings: dict[str, int], real_copies: int
) -> tuple[dict[str, list[tuple[str, np.ndarray, int]]], dict[str, Any]]:
    """{split: [(name, trimmed clip, class)]}, and a description of the voices in each split."""
    for tool in ("espeak-ng", "flite"):
        if shutil.which(tool) is None:
            raise SystemExit("apt-get install -y espeak-ng flite klettres-data")
    if not (KLETTRES / "en" / "alpha").is_dir():
        raise SystemExit("apt-get install -y klettres-data  (GPL-2.0-or-later recordings)")
    rng = np.random.default_rng(seed)
    variants = variant_split(rng)
    clips: dict[str, list[tuple[str, np.ndarray, int]]] = {"train": [], "eval": [], "calibration": []}
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        for split, bucket in clips.items():
            for y, letter in enumerate(LETTERS):
                for k in range(per_class[split]):
                    accent, var = (
                        ACCENTS[rng.integers(len(ACCENTS))],
                        variants[split][rng.integers(len(variants[split]))],
                    )
                    wpm, pitch = int(rng.integers(120, 211)), int(rng.integers(15, 86))
                    wave = espeak(letter, f"{accent}+{var}", wpm, pitch, tmp)
                    bucket.append((f"espeak_{accent}+{var}_s{wpm}_p{pitch}_{k}", trim(wave), y))
                for voice in FLITE[split]:
                    for k in range(flite_settings[split]):
                        stretch, f0 = float(rng.uniform(0.85, 1.3)), int(rng.integers(80, 220))
                        wave = flite(letter, voice, stretch, f0, tmp)
                        bucket.append((f"flite_{voice}_d{stretch:.2f}_f{f0}_{k}", trim(wave), y))
    for y, letter in enumerate(LETTERS):
        clips["eval"].append(("klettres_en_GB", trim(klettres("en_GB", letter)), y))
        real = klettres("en", letter)
        factors = [1.0] + [float(f) for f in np.linspace(0.85, 1.15, real_copies)]
        for f in factors[:real_copies]:
            clips["train"].append((f"klettres_en_x{f:.3f}", trim(speed(real, f)), y))
    voices = {
        "espeak_variants": variants,
        "espeak_accents": list(ACCENTS),
        "flite": {k: list(v) for k, v in FLITE.items()},
        "klettres": {"train": "en (speed-perturbed copies)", "eval": "en_GB", "calibration": "none"},
    }
    return clips, voices


# --------------------------------------------------------------------------- training


def features(extractor: Any, waves: list[np.ndarray]) -> Any:
    import torch

    out = extractor(waves, sampling_rate=RATE, return_tensors="np")["input_values"]
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def augment(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = place(clip, int(rng.integers(0, WINDOW - len(clip) + 1)))
    if rng.random() < 0.6:
        snr = rng.uniform(12, 40)
        power = float((clip**2).mean())
        x = x + rng.normal(0, np.sqrt(power / 10 ** (snr / 10)), size=len(x))
    return pcm16(x * rng.uniform(0.3, 1.0))


def build(hidden: int, layers: int, mask_time_prob: float = 0.05, dropout: float = 0.1) -> tuple[Any, Any]:
    import transformers

    from d2v_export.heads import head_for
    from d2v_export.models import preset_processors
    from d2v_export.spec import Modality

    config = transformers.Data2VecAudioConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        conv_dim=(32, 32, 32, 64, 64, 64, 64),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True,
        num_conv_pos_embeddings=5,
        conv_pos_kernel_size=19,
        num_conv_pos_embedding_groups=16,
        layer_norm_eps=1e-5,
        layerdrop=0.0,
        hidden_dropout=dropout,
        activation_dropout=0.0,
        attention_dropout=dropout,
        feat_proj_dropout=0.0,
        final_dropout=dropout,
        mask_time_prob=mask_time_prob,
        mask_time_length=5,
        classifier_proj_size=hidden,
        use_weighted_layer_sum=False,
        vocab_size=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        id2label=dict(enumerate(LETTERS)),
        label2id={name: i for i, name in enumerate(LETTERS)},
    )
    model = transformers.Data2VecAudioForSequenceClassification(config)
    extractor, _ = preset_processors(Modality.AUDIO, config, head_for(Modality.AUDIO, "audio-classification"))
    return model, extractor


def predict(model: Any, x: Any, batch: int = 64) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model(input_values=x[i : i + batch]).logits.argmax(-1) for i in range(0, len(x), batch)]
        ).numpy()


def write_split(root: Path, clips: list[tuple[str, np.ndarray, int]]) -> list[np.ndarray]:
    import soundfile as sf

    rows, waves = ["file\tlabel"], []
    for i, (name, clip, y) in enumerate(clips):
        wave = pcm16(place(clip))
        rel = f"{LETTERS[y]}/{i:03d}_{name}.wav"
        (root / LETTERS[y]).mkdir(parents=True, exist_ok=True)
        sf.write(str(root / rel), wave, RATE, subtype="PCM_16")
        rows.append(f"{rel}\t{LETTERS[y]}")
        waves.append(wave)
    (root / "labels.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return waves


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    p = parser(__doc__.splitlines()[0], "audio-letters")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--train-per-class", type=int, default=40, help="espeak clips per letter for training")
    p.add_argument(
        "--mask-time-prob",
        type=float,
        default=0.0,
        help="SpecAugment-style time masking while training (slowed it down)",
    )
    p.add_argument("--dropout", type=float, default=0.0, help="hidden/attention/final dropout (slowed it down)")
    args = p.parse_args(argv)
    seed_everything(args.seed, args.threads)
    timer = Timer()

    if args.quick:
        per_class, flite_n, real_copies, args.epochs = (
            {"train": 2, "eval": 1, "calibration": 1},
            {"train": 1, "eval": 1, "calibration": 1},
            1,
            1,
        )
    else:
        per_class, flite_n, real_copies = (
            {"train": args.train_per_class, "eval": 12, "calibration": 5},
            {"train": 4, "eval": 3, "calibration": 2},
            6,
        )
    clips, voices = build_clips(args.seed, per_class, flite_n, real_copies)
    synth_s = timer()
    log(
        f"{len(LETTERS)} letters: train {len(clips['train'])}, eval {len(clips['eval'])}, calibration {len(clips['calibration'])} clips ({synth_s} s)"
    )

    model, extractor = build(args.hidden, args.layers, args.mask_time_prob, args.dropout)
    log(f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters")
    out = fresh_dir(args.output)
    eval_waves = write_split(out / "eval", clips["eval"])
    write_split(out / "calibration", clips["calibration"])
    x_eval = features(extractor, eval_waves)
    y_eval = np.array([y for _, _, y in clips["eval"]])
    real_eval = np.array([name.startswith("klettres") for name, _, _ in clips["eval"]])

    train = clips["train"]
    y_train = torch.tensor([y for _, _, y in train])
    rng = np.random.default_rng(args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    total = 2 if args.quick else args.epochs * -(-len(train) // args.batch)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, total - warm)))
    )
    step = 0
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(train))
        losses = []
        for i in range(0, len(order), args.batch):
            if step >= total:
                break
            idx = order[i : i + args.batch]
            x = features(extractor, [augment(train[j][1], rng) for j in idx])
            loss = model(input_values=x, labels=y_train[idx]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            acc = int((predict(model, x_eval) == y_eval).sum()) / len(y_eval)
            log(f"epoch {epoch + 1}/{args.epochs}: loss {np.mean(losses):.4f}, held-out acc {acc:.4f} ({timer()} s)")
    train_s = round(timer() - synth_s, 1)
    pred = predict(model, x_eval)
    acc = int((pred == y_eval).sum()) / len(y_eval)  # exact ratio: compared with d2v-export's count below
    groups = {
        "klettres_en_GB (real, unseen speaker)": real_eval,
        "flite slt (unseen voice)": np.array([n.startswith("flite_slt") for n, _, _ in clips["eval"]]),
        "espeak unseen variants": np.array([n.startswith("espeak") for n, _, _ in clips["eval"]]),
    }
    by_group = {k: f"{int((pred[m] == y_eval[m]).sum())}/{int(m.sum())}" for k, m in groups.items()}
    log(f"held-out accuracy {acc:.4f}; {by_group}")

    model.save_pretrained(str(out))
    extractor.save_pretrained(str(out))
    loaded = check_loads(out, "audio")
    via_tool, n = reader_accuracy(loaded, out / "eval")
    log(f"saved checkpoint read back by d2v-export: {n} eval clips, accuracy {via_tool:.4f}")
    if abs(via_tool - acc) > 1e-9:
        raise SystemExit(f"d2v-export's reader gives accuracy {via_tool:.4f}, training saw {acc:.4f}")
    meta = {
        "task": "audio-classification",
        "labels": list(LETTERS),
        "heldout_accuracy": acc,
        "heldout_by_source": by_group,
        "splits": {k: len(v) for k, v in clips.items()},
        "voices": voices,
        "train_steps": step,
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "quick": args.quick,
        "architecture": {"hidden": args.hidden, "layers": args.layers, "conv_dim": list(model.config.conv_dim)},
        "parameters": int(sum(q.numel() for q in model.parameters())),
        "synthesis_seconds": synth_s,
        "train_seconds": train_s,
        "total_seconds": timer(),
        "data": "klettres-data (KDE KLettres, GPL-2.0-or-later) + espeak-ng / flite synthesis",
    }
    write_meta(out, meta)
    meta["checkpoint_bytes"] = folder_size(out)
    log(f"saved {out} ({meta['checkpoint_bytes'] / 1e6:.1f} MB) in {meta['total_seconds']} s")
    return meta


if __name__ == "__main__":
    main()
