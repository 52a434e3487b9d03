"""Load a Data2Vec checkpoint, or build an offline preset, and hand back an eval-mode module.

Presets copy the exact architecture of real checkpoints (with random weights, said loudly):

    vision base  = facebook/data2vec-vision-base-ft1k   (1000 ImageNet labels, relative position bias, mean pooling)
    vision large = facebook/data2vec-vision-large-ft1k
    audio  base  = facebook/data2vec-audio-base-960h    (CTC head, 32-symbol character vocabulary)
    audio  large = facebook/data2vec-audio-large-960h
    text   base  = facebook/data2vec-text-base          (RoBERTa-base shape, 50265 BPE tokens)
    text   large = the RoBERTa-large shape (facebook publishes no data2vec-text-large)
    tiny         = the same structure, a few thousand parameters wide, for tests

torch and transformers are imported inside functions so that `d2v-export --help` stays fast.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import assets
from .heads import DEFAULT_TASK, SAMPLING_RATE, Head, head_for, head_for_class
from .spec import D2VError, Modality, ModelSpec, SourceKind

PRESETS = ("tiny", "base", "large")

# The 32-symbol character vocabulary of facebook/data2vec-audio-base-960h (wav2vec2 LibriSpeech CTC).
CTC_VOCAB: tuple[str, ...] = (
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "|",
    "E",
    "T",
    "A",
    "O",
    "N",
    "I",
    "H",
    "S",
    "R",
    "D",
    "L",
    "U",
    "M",
    "W",
    "C",
    "F",
    "G",
    "Y",
    "P",
    "B",
    "V",
    "K",
    "'",
    "X",
    "J",
    "Q",
    "Z",
)

_ARCH: dict[tuple[Modality, str], dict[str, Any]] = {
    (Modality.VISION, "base"): dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    (Modality.VISION, "large"): dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        out_indices=[7, 11, 15, 23],
    ),
    (Modality.VISION, "tiny"): dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        out_indices=[0, 1, 2, 3],
        auxiliary_channels=16,
        pool_scales=[1, 2, 3, 6],
    ),
    (Modality.TEXT, "base"): dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    (Modality.TEXT, "large"): dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    (Modality.TEXT, "tiny"): dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
    (Modality.AUDIO, "base"): dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    (Modality.AUDIO, "large"): dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    (Modality.AUDIO, "tiny"): dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        conv_dim=(32, 32, 32, 32, 32, 32, 32),
        num_conv_pos_embedding_groups=4,
        conv_pos_kernel_size=5,
        num_conv_pos_embeddings=3,
        classifier_proj_size=16,
        tdnn_dim=(32, 32, 32, 32, 64),
        xvector_output_dim=16,
    ),
}

# Fields shared by every size, as in the real checkpoints' config.json.
_COMMON: dict[Modality, dict[str, Any]] = {
    Modality.VISION: dict(
        use_relative_position_bias=True,
        use_shared_relative_position_bias=False,
        use_absolute_position_embeddings=False,
        use_mean_pooling=True,
        layer_scale_init_value=0.1,
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.1,
        use_auxiliary_head=True,
    ),
    Modality.TEXT: dict(
        vocab_size=50265,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    Modality.AUDIO: dict(
        vocab_size=len(CTC_VOCAB),
        conv_bias=True,
        layer_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        ctc_loss_reduction="sum",
    ),
}

_CONFIG_CLASS = {
    Modality.VISION: "Data2VecVisionConfig",
    Modality.TEXT: "Data2VecTextConfig",
    Modality.AUDIO: "Data2VecAudioConfig",
}
_MODEL_TYPE = {m: f"data2vec-{m.value}" for m in Modality}
_REAL_NAME = {
    (Modality.VISION, "base"): "facebook/data2vec-vision-base-ft1k",
    (Modality.VISION, "large"): "facebook/data2vec-vision-large-ft1k",
    (Modality.TEXT, "base"): "facebook/data2vec-text-base",
    (Modality.TEXT, "large"): "roberta-large shape",
    (Modality.AUDIO, "base"): "facebook/data2vec-audio-base-960h",
    (Modality.AUDIO, "large"): "facebook/data2vec-audio-large-960h",
}


@dataclass(frozen=True)
class LoadedModel:
    """An eval-mode transformers module with everything needed to feed it and to describe it."""

    module: Any  # torch.nn.Module
    config: Any  # transformers.PretrainedConfig
    head: Head
    processor: Any | None  # image processor or audio feature extractor
    tokenizer: Any | None  # text tokenizer, or the CTC tokenizer of an ASR model
    random_weights: bool
    parameters: int
    checkpoint_dir: Path | None
    description: str  # e.g. "preset:base (architecture of facebook/data2vec-vision-base-ft1k)"
    warnings: tuple[str, ...] = ()

    def save_pretrained_files(self, folder: Path) -> list[Path]:
        """Write config.json and the processor / tokenizer files the way Hugging Face lays them out."""
        before = set(folder.rglob("*")) if folder.exists() else set()
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        for part in (self.processor, self.tokenizer):
            if part is not None:
                part.save_pretrained(folder)
        return sorted(p for p in set(folder.rglob("*")) - before if p.is_file())


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_source(source: str, modality: Modality, task: str | None) -> ModelSpec:
    """Classify --model: 'preset:NAME', an existing folder, or a hub id. Fails early on a bad path."""
    if source.startswith("preset:"):
        name = source.split(":", 1)[1]
        if name not in PRESETS:
            raise D2VError(f"unknown preset '{name}'; choose one of: {', '.join('preset:' + p for p in PRESETS)}")
        kind = SourceKind.PRESET
    elif Path(source).expanduser().exists():
        kind = SourceKind.LOCAL
        source = str(Path(source).expanduser())
    elif (
        source.startswith((".", "/", "~"))
        or source.endswith("/")
        or os.sep + os.sep in source
        or not _HUB_ID.match(source)
    ):
        raise D2VError(f"model path '{source}' does not exist; pass a checkpoint folder, a hub id or preset:base")
    else:
        kind = SourceKind.HUB
    if task is not None:
        head_for(modality, task)  # validates the name
    return ModelSpec(source=source, kind=kind, modality=modality, task=task)


def load(spec: ModelSpec) -> LoadedModel:
    import transformers

    transformers.utils.logging.set_verbosity_error()  # its advice is for its own users, not ours
    if spec.kind is SourceKind.PRESET:
        return _build_preset(spec)
    return _load_checkpoint(spec)


# --------------------------------------------------------------------------- presets


def preset_config(modality: Modality, preset: str, head: Head) -> Any:
    import transformers

    fields = dict(_COMMON[modality]) | dict(_ARCH[(modality, preset)])
    if modality is Modality.VISION and head.task == "image-classification":
        labels = assets.imagenet_labels()
        fields["id2label"] = dict(enumerate(labels))
        fields["label2id"] = {name: i for i, name in enumerate(labels)}
    if modality is Modality.VISION and head.task == "semantic-segmentation":
        labels = assets.ade20k_labels()
        fields["id2label"] = dict(enumerate(labels))
        fields["label2id"] = {name: i for i, name in enumerate(labels)}
    if head.task == "text-generation":
        fields["is_decoder"] = True
    if modality is Modality.TEXT:
        fields["use_cache"] = False
    config = getattr(transformers, _CONFIG_CLASS[modality])(**fields)
    config.architectures = [head.class_name]
    return config


def _build_preset(spec: ModelSpec) -> LoadedModel:
    import torch
    import transformers

    preset = spec.preset or "base"
    head = head_for(spec.modality, spec.task or DEFAULT_TASK[spec.modality])
    config = preset_config(spec.modality, preset, head)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    module = getattr(transformers, head.class_name)(config, **dict(head.init_kwargs)).eval()
    processor, tokenizer = preset_processors(spec.modality, config, head)
    real = _REAL_NAME.get((spec.modality, preset), "a tiny test configuration")
    return LoadedModel(
        module=module,
        config=config,
        head=head,
        processor=processor,
        tokenizer=tokenizer,
        random_weights=True,
        parameters=_count(module),
        checkpoint_dir=None,
        description=f"preset:{preset} (architecture of {real}; RANDOM WEIGHTS)",
        warnings=(
            f"RANDOM WEIGHTS: preset:{preset} has the architecture of {real} but untrained weights; "
            "latency is real, accuracy numbers only measure export and quantization drift",
        ),
    )


def preset_processors(modality: Modality, config: Any, head: Head) -> tuple[Any | None, Any | None]:
    """The processors the real checkpoints ship, built offline."""
    import transformers

    if modality is Modality.VISION:
        size = int(config.image_size)
        proc = transformers.BeitImageProcessor(
            do_resize=True,
            size={"height": size, "width": size},
            resample=2,
            do_center_crop=False,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            do_reduce_labels=head.task == "semantic-segmentation",
        )
        return proc, None
    if modality is Modality.AUDIO:
        extractor = transformers.Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=SAMPLING_RATE,
            padding_value=0.0,
            do_normalize=True,
            return_attention_mask=True,
        )
        tok = None
        if head.task == "automatic-speech-recognition":
            tok = assets.ctc_tokenizer(CTC_VOCAB)
        return extractor, tok
    return None, assets.text_tokenizer()


def _count(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# --------------------------------------------------------------------------- checkpoints


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise D2VError(f"'{folder}' has no config.json; pass a Hugging Face checkpoint folder or preset:base")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise D2VError(
            f"'{path}' is not valid JSON ({exc.__class__.__name__}: {exc}); fix or re-download the checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise D2VError(f"'{path}' must hold a JSON object; fix or re-download the checkpoint")
    return data


def check_modality(model_type: object, modality: Modality, where: str) -> None:
    if model_type == _MODEL_TYPE[modality]:
        return
    for other, name in _MODEL_TYPE.items():
        if model_type == name:
            raise D2VError(
                f"{where} is a {name} checkpoint, not {modality.value}; run `d2v-export {other.value}` instead"
            )
    raise D2VError(
        f"{where} is not a Data2Vec checkpoint (model_type {model_type!r}); d2v-export takes data2vec-vision, -text or -audio models"
    )


def _load_checkpoint(spec: ModelSpec) -> LoadedModel:
    import transformers

    warnings: list[str] = []
    if spec.kind is SourceKind.LOCAL:
        folder = Path(spec.source)
        if not folder.is_dir():
            raise D2VError(f"'{folder}' is a file; pass the checkpoint folder that holds config.json")
        raw = read_config(folder)
        check_modality(raw.get("model_type"), spec.modality, f"'{folder}'")
        where: str | Path = folder
    else:
        where = spec.source
        config_try = _hub(
            lambda: transformers.AutoConfig.from_pretrained(spec.source, trust_remote_code=False), spec.source
        )
        check_modality(getattr(config_try, "model_type", None), spec.modality, f"'{spec.source}'")
        raw = config_try.to_dict()
    own = next((h for h in map(head_for_class, raw.get("architectures") or []) if h is not None), None)
    head = head_for(spec.modality, spec.task) if spec.task else (own or head_for(spec.modality, "feature-extraction"))
    config_cls = getattr(transformers, _CONFIG_CLASS[spec.modality])
    try:
        config = config_cls.from_pretrained(where)
    except (ValueError, TypeError, KeyError) as exc:
        raise D2VError(
            f"config.json of '{where}' cannot be read as {config_cls.__name__}: {exc}; fix or re-download it"
        ) from None
    if head.task == "text-generation" and not getattr(config, "is_decoder", False):
        config.is_decoder = True
        warnings.append("text-generation: set is_decoder=True on a checkpoint trained as an encoder")
    if spec.modality is Modality.TEXT:
        config.use_cache = False
    if own is None or own.class_name != head.class_name:
        if head.task != "feature-extraction":
            warnings.append(f"the checkpoint has no {head.class_name} head: its head weights are RANDOM")
    cls = getattr(transformers, head.class_name)

    def _from_pretrained() -> Any:
        return cls.from_pretrained(
            where, config=config, attn_implementation="eager", trust_remote_code=False, **dict(head.init_kwargs)
        )

    if spec.kind is SourceKind.LOCAL:
        check_weights(Path(where))
    try:
        module = _hub(_from_pretrained, spec.source) if spec.kind is SourceKind.HUB else _from_pretrained()
    except OSError as exc:
        raise D2VError(
            f"cannot load weights from '{where}': {str(exc).splitlines()[0]}; the folder needs model.safetensors or pytorch_model.bin"
        ) from None
    except Exception as exc:  # what torch and safetensors raise on a damaged file that check_weights let through
        if spec.kind is not SourceKind.LOCAL or not _damaged(exc):
            raise
        names = ", ".join(p.name for p in weight_files(Path(where))) or "its weights file"
        raise D2VError(
            f"the weights in '{where}' ({names}) cannot be read ({exc.__class__.__name__}): the file is truncated or corrupt; "
            "re-download or re-save the checkpoint"
        ) from None
    module.eval()
    processor, tokenizer, missing = _checkpoint_processors(spec.modality, where, config, head)
    if missing:
        warnings.append(missing)
    return LoadedModel(
        module=module,
        config=config,
        head=head,
        processor=processor,
        tokenizer=tokenizer,
        random_weights=False,
        parameters=_count(module),
        checkpoint_dir=Path(spec.source) if spec.kind is SourceKind.LOCAL else None,
        description=spec.source,
        warnings=tuple(warnings),
    )


def weight_files(folder: Path) -> list[Path]:
    """The weights transformers loads from a checkpoint folder: safetensors first, else pytorch_model*.bin."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def check_weights(folder: Path) -> None:
    """Refuse a truncated or corrupt weights file by its structure (cheap: headers and sizes, no tensor data read)."""
    for path in weight_files(folder):
        why = _safetensors_damage(path) if path.suffix == ".safetensors" else _torch_damage(path)
        if why:
            raise D2VError(
                f"weights file '{path}' is truncated or corrupt ({why}); re-download or re-save the checkpoint"
            )


def _safetensors_damage(path: Path) -> str | None:
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than a safetensors header"
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if 8 + n > size:
            return f"its header claims {n} bytes, the file has {size}"
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is not valid safetensors JSON"
    want = 8 + n + max(ends, default=0)
    if want != size:
        return f"its header describes {want} bytes, the file has {size}"
    return None


def _torch_damage(path: Path) -> str | None:
    import zipfile

    with path.open("rb") as fh:
        head = fh.read(4)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            return f"not a complete torch.save archive: {exc}"
        return None
    if head[:1] == b"\x80":  # a pre-zip torch.save (pickle): nothing cheap to check
        return None
    return "neither a torch.save archive nor a pickle"


def _damaged(exc: BaseException) -> bool:
    import pickle
    import zipfile

    if (
        isinstance(exc, (EOFError, pickle.UnpicklingError, zipfile.BadZipFile))
        or type(exc).__name__ == "SafetensorError"
    ):
        return True
    return "PytorchStreamReader" in str(exc)


def _checkpoint_processors(
    modality: Modality, where: str | Path, config: Any, head: Head
) -> tuple[Any | None, Any | None, str | None]:
    import transformers

    def attempt(fn: Any) -> Any | None:
        try:
            return fn(where)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    processor = tokenizer = None
    if modality is Modality.VISION:
        processor = attempt(transformers.AutoImageProcessor.from_pretrained)
    elif modality is Modality.AUDIO:
        processor = attempt(transformers.AutoFeatureExtractor.from_pretrained)
        if head.task == "automatic-speech-recognition":
            tokenizer = attempt(transformers.AutoTokenizer.from_pretrained)
    else:
        tokenizer = attempt(transformers.AutoTokenizer.from_pretrained)
    # A checkpoint without its own processor files gets the preset's, which may not match its training.
    missing = None
    if modality is Modality.TEXT and tokenizer is None:
        missing = (
            f"'{where}' has no tokenizer files: using the bundled GPT-2 byte-level BPE in RoBERTa's layout, "
            "whose ids differ from real RoBERTa/data2vec-text vocabularies; copy the checkpoint's tokenizer files in"
        )
    elif modality is not Modality.TEXT and processor is None:
        missing = f"'{where}' has no preprocessor_config.json: using the preset's {modality.value} processor settings"
    default_proc, default_tok = preset_processors(modality, config, head)
    return processor or default_proc, tokenizer or default_tok, missing


def _hub(fn: Any, hub_id: str) -> Any:
    """Call a hub loader; turn 'no network' and 'no such repo' into one-line errors."""
    try:
        return fn()
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if (
            "offline" in first.lower()
            or "connect" in first.lower()
            or "resolve" in first.lower()
            or "couldn't" in first.lower()
        ):
            raise D2VError(
                f"cannot reach the Hugging Face hub for '{hub_id}' (offline?); download it and pass its local folder, or use preset:base"
            ) from None
        raise D2VError(
            f"cannot load '{hub_id}' from the hub: {first}; pass a local checkpoint folder or preset:base"
        ) from None
