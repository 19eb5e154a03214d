"""What the stages load and save, and the error a bad input raises: prompt files, the real model (a
diffusers SD3 folder or hub id), LoRA adapters on one base model (peft), and all-or-nothing writes.
None of it is the method (that is common.py); all of it is what the method runs on.

    UserError                      a bad flag value, file, prompt or server reply
    load_prompts, prompts_by_task  flow_grpo's prompt files, grouped by the router R(c)
    ModelBundle, load_sd3          the real model
    add_lora ... save_adapter      a trainable student and frozen teachers as LoRA adapters on ONE base
    atomic_write_dir, ..._save     a folder or file is either the old complete version or the new one
"""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Callable

import torch

from common import route

class UserError(ValueError):
    """A bad flag value, file, prompt or server reply: the entry points print `error: <message>` and
    exit with status 2 instead of a traceback (training.run_cli). Any other exception is a bug and raises."""



# ----------------------------------------------------------------------------------------------
# Prompt files (flow_grpo's formats), grouped by the router R(c) (docs/method.md, M4)


def load_prompts(path):
    """[(prompt, metadata or None)] from flow_grpo's formats: a GenEval metadata .jsonl (one JSON
    object with a "prompt" per line) or a .txt file (one prompt per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist; expected a .jsonl of GenEval metadata "
                                f"or a .txt with one prompt per line")
    items = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    meta = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); expected one JSON object per line") from None
                if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
                    raise UserError(f"{path}:{number}: expected a JSON object with a string \"prompt\", got {line.strip()[:80]!r}")
                items.append((meta["prompt"], meta))
            else:
                items.append((line.strip(), None))
    if not items:
        raise UserError(f"prompt file {path!r} holds no prompts")
    return items


DEFAULT_PROMPT_FILES = {"geneval": {"train": "geneval/train_metadata.jsonl", "test": "geneval/test_metadata.jsonl"},
                        "ocr": {"train": "ocr/train.txt", "test": "ocr/test.txt"}}
# Other tasks' files in flow_grpo's dataset layout (--dataset flow_grpo/dataset): PickScore trains on dataset/pickscore
TASK_PROMPT_FILES = {**DEFAULT_PROMPT_FILES, "pickscore": {"train": "pickscore/train.txt", "test": "pickscore/test.txt"}}


def load_prompt_files(spec):
    """[(prompt, metadata)] of comma-separated prompt files. An entry `task=path` labels each of its prompts
    with that task (metadata "task", which the router R(c) follows): a plain prompt file such as flow_grpo's
    dataset/pickscore/train.txt then routes to its teacher, e.g. "pickscore=dataset/pickscore/train.txt"."""
    items = []
    for entry in filter(None, spec.split(",")):
        task, _, path = entry.rpartition("=")
        items += [(prompt, {**(meta or {}), "task": task} if task else meta) for prompt, meta in load_prompts(path)]
    return items


def default_prompt_files(tasks, dataset, split):
    """The `task=path` spec of the tasks' own `split` files in `dataset` (TASK_PROMPT_FILES)."""
    unknown = [t for t in tasks if t not in TASK_PROMPT_FILES]
    if unknown:
        raise UserError(f"no default prompt files for task(s) {unknown} (known: {sorted(TASK_PROMPT_FILES)}); pass the "
                        f"prompt files explicitly, labelled task=path")
    return ",".join(f"{t}={os.path.join(dataset, TASK_PROMPT_FILES[t][split])}" for t in tasks)


def prompts_by_task(files, tasks, dataset, split):
    """{task: [(prompt, metadata)]}: the prompts of comma-separated `files` (`path` or `task=path`; when
    empty, the dataset's `split` files of `tasks`, each labelled with its task) grouped by the router. A
    prompt routed to a task outside `tasks`, or a task left with no prompt, is an error now rather than mid-run."""
    spec = files or default_prompt_files(tasks, dataset, split)
    grouped = {task: [] for task in tasks}
    for prompt, meta in load_prompt_files(spec):
        try:
            grouped[route(prompt, meta, set(tasks))].append((prompt, meta))
        except ValueError as err:  # route() raises a plain ValueError, to stay copyable without this module
            raise UserError(f"{err} (in {spec})") from None
    empty = [task for task, items in grouped.items() if not items]
    if empty:
        raise UserError(f"no {split} prompt routes to task(s) {empty}; expected prompts of every task in {spec} "
                        f"(a plain prompt file of another task: label it, task=path)")
    return grouped


# ----------------------------------------------------------------------------------------------
# The model bundle: what every stage needs of a base model (SD3 here; miniature/model.py for the miniature)


@dataclasses.dataclass
class ModelBundle:
    transformer: torch.nn.Module        # SD3Transformer2DModel: velocity v(x, 1000 sigma, text)
    scheduler: object                   # FlowMatchEulerDiscreteScheduler: gives the sigmas
    encode: Callable                    # list[str] -> (embeds (B, T, D), pooled (B, P)), no grad
    decode: Callable                    # latents -> images (B, 3, H, W) in [0, 1], no grad
    latent_shape: Callable              # resolution (px) -> (C, h, w)
    resolution: int                     # the model's native resolution in pixels
    kind: str                           # "miniature" or "sd3"
    path: str
    defaults: dict = dataclasses.field(default_factory=lambda: {"eval_steps": 40, "guidance_scale": 4.5,  # paper's
                                                                "lora_targets": FLOW_GRPO_LORA_TARGETS,
                                                                # eval: prompts sampled / latents VAE-decoded at once
                                                                "eval_batch_size": 16, "decode_batch_size": 4})


# The published Flow-GRPO teachers' LoRA layout (r 32, alpha 64, Gaussian init) on SD3's joint attention
FLOW_GRPO_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                          "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


def load_sd3(path_or_id, device="cpu", dtype=torch.float32, text_encoder_3=True, max_sequence_length=128):
    """The real model (SD3 / SD3.5) from a diffusers pipeline folder or hub id. The prompt embeddings are
    diffusers' encode_prompt at `max_sequence_length` T5 tokens (flow_grpo's 128, on which the published
    teachers were trained). Without T5 only the two CLIP encoders run and, exactly as diffusers does,
    `max_sequence_length` zero rows stand where T5's would: after context_embedder identical rows are
    identical keys, so their number changes the attention."""
    from diffusers import StableDiffusion3Pipeline
    has_t5 = text_encoder_3
    index = os.path.join(str(path_or_id), "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            has_t5 = has_t5 and (json.load(f).get("text_encoder_3") or [None])[0] is not None
    extra = {} if has_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path_or_id, dtype=dtype, **extra).to(device)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.eval().requires_grad_(False)

    @torch.no_grad()
    def encode(prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return embeds, pooled

    @torch.no_grad()
    def decode(latents):
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return (pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    factor = pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels
    resolution = min(512, pipe.transformer.config.sample_size * factor)  # the paper trains SD3.5-M at 512 px
    return ModelBundle(pipe.transformer, pipe.scheduler, encode, decode,
                       lambda res: (channels, res // factor, res // factor), resolution, "sd3", str(path_or_id))


# ----------------------------------------------------------------------------------------------
# LoRA adapters on ONE base model (peft): a trainable student, frozen named teachers


def add_lora(transformer, rank=32, alpha=64, targets=FLOW_GRPO_LORA_TARGETS, name="student"):
    """Wraps the transformer in a PeftModel with one trainable LoRA adapter `name` (the paper's
    rank 32 / alpha 64 on the attention projections). Returns the PeftModel: call it like the
    transformer; it also accepts adapter_names=[...] for per-sample mixed-adapter batches."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    return get_peft_model(transformer, config, adapter_name=name)


def load_adapter(peft_model, folder, name):
    """Loads a frozen adapter from a peft folder (adapter_config.json + adapter_model.safetensors,
    the layout of the published Flow-GRPO LoRAs; or their hub id) and restores the previously active adapter."""
    folder = resolve_adapter(folder)
    if not os.path.isfile(os.path.join(str(folder), "adapter_config.json")):
        raise FileNotFoundError(f"adapter folder {str(folder)!r} has no adapter_config.json; expected a peft "
                                f"folder with adapter_config.json and adapter_model.safetensors")
    check_adapter_fits(peft_model, folder)
    active = peft_model.active_adapter
    peft_model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    peft_model.set_adapter(active)
    freeze_all_but(peft_model, active)
    return peft_model


def check_adapter_fits(peft_model, folder):
    """(peft_model: a PeftModel or the bare base.) A clear error if a peft adapter folder was trained on another base: every LoRA pair must name
    a linear layer of this base with matching input/output sizes."""
    from safetensors import safe_open
    weights = os.path.join(str(folder), "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"adapter folder {str(folder)!r} has no adapter_model.safetensors")
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    modules = dict(base.named_modules())
    with safe_open(weights, "pt") as f:
        for key in f.keys():
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
            if not match:
                continue
            module = modules.get(match.group(1))
            layer = getattr(module, "base_layer", module)
            shape = f.get_slice(key).get_shape()
            size, expected = (shape[1], "in_features") if match.group(2) == "A" else (shape[0], "out_features")
            if layer is None or getattr(layer, expected, None) != size:
                found = "no such layer" if layer is None else f"{expected}={getattr(layer, expected, None)}"
                raise UserError(f"adapter {str(folder)!r} does not fit this base model: {key} has {expected}={size} "
                                 f"but the base has {found}; expected an adapter trained on this base")


def parse_teachers(text):
    """'geneval=PATH,ocr=PATH' -> {'geneval': PATH, 'ocr': PATH}, each a peft folder that exists."""
    teachers = {}
    for part in filter(None, text.split(",")):
        task, sep, path = part.partition("=")
        path = resolve_adapter(path) if path else path
        if not sep or not task or not path:
            raise UserError(f"cannot parse {part!r} in --teachers {text!r}; expected task=peft_folder,task=peft_folder")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"teacher {task!r}: adapter folder {path!r} has no adapter_config.json; expected a "
                                    f"peft folder such as runs/teacher-{task}/adapter")
        teachers[task] = path
    if not teachers:
        raise UserError("--teachers is empty; expected task=peft_folder,...")
    return teachers


def adapter_layout(folder):
    """(rank, alpha, sorted target modules) of a peft adapter folder."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    targets = config["target_modules"]
    return config["r"], config["lora_alpha"], sorted([targets] if isinstance(targets, str) else targets)


def check_same_layout(adapters):
    """All adapters {name: folder} have one rank, alpha and target set: what the `ab` merge rule (adding
    A and B matrices key by key) needs. Other rules and Stage 3's mixed batches take any layouts."""
    layouts = {name: adapter_layout(folder) for name, folder in adapters.items()}
    first = next(iter(layouts))
    for name, layout in layouts.items():
        if layout != layouts[first]:
            raise UserError(f"adapter {name!r} ({adapters[name]}) has rank/alpha/targets {layout}, but {first!r} "
                             f"({adapters[first]}) has {layouts[first]}; expected teachers of one LoRA layout")


def freeze_all_but(peft_model, trainable):
    """Only adapter `trainable`'s LoRA weights require grad (peft's set_adapter unfreezes the one it
    activates, which would make a teacher trainable)."""
    for param_name, param in peft_model.named_parameters():
        param.requires_grad_(trainable is not None and f".{trainable}." in param_name)


@contextlib.contextmanager
def use_adapter(peft_model, name):
    """Runs the block with adapter `name` active (None: adapters disabled, the base model), then
    restores the previous adapter and the student-only trainable set."""
    previous = peft_model.active_adapter
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    try:
        if name is None:
            with peft_model.disable_adapter():
                yield peft_model
        else:
            peft_model.set_adapter(name)
            yield peft_model
    finally:
        if name is not None:
            peft_model.set_adapter(previous)
        for n, p in peft_model.named_parameters():
            p.requires_grad_(n in trainable)


def save_adapter(peft_model, name, folder):
    """Writes adapter `name` atomically as a peft folder (adapter_config.json + adapter_model.safetensors,
    the published Flow-GRPO layout) that also holds pytorch_lora_weights.safetensors, the same weights in
    diffusers' format, so `StableDiffusion3Pipeline.load_lora_weights(folder)` works too."""
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    def write(tmp):
        peft_model.save_pretrained(tmp, selected_adapters=[name])
        where = os.path.join(tmp, name) if name != "default" else tmp
        state = {key.removeprefix("base_model.model."): value.contiguous() for key, value in
                 get_peft_model_state_dict(peft_model, adapter_name=name).items()}
        StableDiffusion3Pipeline.save_lora_weights(where, transformer_lora_layers=state,
                                                   transformer_lora_adapter_metadata=peft_model.peft_config[name].to_dict())
    atomic_write_dir(folder, write, subfolder=name if name != "default" else None)


def resolve_adapter(path_or_id):
    """A peft adapter folder from a local path or a hub id such as 'jieliu/SD3.5M-FlowGRPO-GenEval' (the
    published Flow-GRPO teachers): the hub cache first, then a download."""
    path = str(path_or_id)
    if os.path.exists(path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return path
    from huggingface_hub import snapshot_download
    patterns = ["adapter_config.json", "adapter_model.safetensors"]
    try:
        return snapshot_download(path, allow_patterns=patterns, local_files_only=True)
    except Exception:
        try:
            return snapshot_download(path, allow_patterns=patterns)
        except Exception as err:
            raise FileNotFoundError(f"adapter {path!r} is not a local folder and could not be fetched from the hub "
                                    f"({type(err).__name__}); expected a peft folder or a hub id like "
                                    f"'jieliu/SD3.5M-FlowGRPO-GenEval'") from None


# ----------------------------------------------------------------------------------------------
# Atomic writes: a folder or file is either the old complete version or the new one


def atomic_write_dir(folder, write, subfolder=None):
    """Calls write(tmp_dir) and then moves the result into `folder` in one rename, so `folder` is
    either the old complete version or the new complete one. `subfolder`: the part of tmp_dir to keep."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        write(tmp)
        source = os.path.join(tmp, subfolder) if subfolder else tmp
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            os.rename(folder, os.path.join(old, "previous"))
        try:
            os.rename(source, folder)
        except OSError:
            if old:
                os.rename(os.path.join(old, "previous"), folder)
            raise
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def atomic_torch_save(obj, path):
    """torch.save to a temporary file, then an atomic rename over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
