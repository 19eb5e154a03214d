"""The rewards (docs/method.md M8), one API for both worlds:

    score = rewards.make_scorer(args, bundle)         # from the flags of rewards.add_arguments
    score(images, prompts, metadata, names) -> {name: float array}    # images (B, 3, H, W) in [0, 1]

A reward is NaN for a prompt it does not judge (an OCR prompt has no GenEval score).
- miniature world (miniature/world.py): `geneval` (a detector on flat-colour scenes), `ocr` (rapidocr, recognition
  only on one-line 64 px images), `quality` (the flat-colour stand-in for DeQA);
- real world: `ocr` (rapidocr, detection + recognition), `pickscore` (a CLIP preference model,
  logit_scale * cos / 26), `geneval` and `deqa` (clients of flow_grpo's reward servers; the DeQA server
  already sends its 1-5 score / 5).
GenEval gives three numbers: `geneval` (partial credit, the training reward), `geneval_acc` (the official
GenEval check: at least each asked count, exclude clauses; the paper's GenEval column) and, from the real
server only, `geneval_strict` (exact counts, flow_grpo's stricter variant); the miniature's detector adds
`geneval_clean` (the official check and no object beyond the asked ones: the rule lets clutter pass).

The reward servers speak flow_grpo's protocol: a POST whose body is a pickled dict of JPEG bytes, and a
pickled dict back. A pickle can call any function, so the reply is unpickled with an allow-list (builtins'
containers and numbers, numpy arrays and scalars: `plain_data_loads`), the client talks only to the URL the
user gives (redirects are refused) and never to a default address.
"""
import codecs
import io
import pickle
import re
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image

import loading
import miniature.world
import training

NAMES = ("geneval", "ocr", "quality", "pickscore", "deqa")
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"                   # the paper's PickScore weights
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"    # its processor (tokenizer + image transform)


def add_arguments(p):
    """The reward flags shared by the stages and eval.py."""
    p.add_argument("--pickscore-model", default=PICKSCORE_MODEL, help="CLIPModel folder or hub id")
    p.add_argument("--pickscore-processor", default=PICKSCORE_PROCESSOR, help="its AutoProcessor folder or hub id")
    p.add_argument("--geneval-url", default=None, help="flow_grpo GenEval reward server, e.g. http://127.0.0.1:18085")
    p.add_argument("--deqa-url", default=None, help="flow_grpo DeQA reward server, e.g. http://127.0.0.1:18086")
    p.add_argument("--reward-timeout", type=training.positive_float, default=120.0,
                   help="seconds per reward-server request")
    p.add_argument("--reward-retries", type=training.nonnegative_int, default=3,
                   help="retries of a failed request (then a clear error)")
    p.add_argument("--jpeg-quality", type=int, choices=range(1, 96), default=75, metavar="1..95",
                   help="JPEG quality of the images sent to the reward servers (flow_grpo: PIL's default, 75)")
    p.add_argument("--pickscore-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="PickScore's weights (auto: fp16 on a GPU, ~2 GB instead of ~4, fp32 on the CPU)")
    p.add_argument("--pickscore-offload", action="store_true",
                   help="keep PickScore on the CPU between evaluations (moved to --device only while scoring)")
    p.add_argument("--eval-rewards", default=None,
                   help="rewards of the test evaluation (default: the world's, see eval_names)")


def from_args(args, bundle):
    """(score, names of the test evaluation) from the flags of add_arguments."""
    return make_scorer(args, bundle), eval_names(args, bundle)


def eval_names(args, bundle):
    """--eval-rewards, or the world's table columns: geneval, ocr, quality in the miniature world;
    ocr, pickscore, and geneval / deqa where their servers are given, on real models."""
    if args.eval_rewards:
        names = tuple(args.eval_rewards.split(","))
        check_names(names, f"--eval-rewards {args.eval_rewards!r}")
        return names
    if bundle.kind == "miniature":
        return ("geneval", "ocr", "quality")
    return tuple(n for n in ("geneval", "ocr", "deqa", "pickscore") if n in ("ocr", "pickscore") or getattr(args, f"{n}_url"))


def check_names(names, where="--reward"):
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise loading.UserError(f"unknown reward {unknown[0]!r} in {where}; expected names from {list(NAMES)}")


def make_scorer(args, bundle):
    """score(images, prompts, metadata, names) for this model's world; real scorers load on first use."""
    is_miniature = bundle.kind == "miniature"
    loaded = {}

    def scorer(name):
        if name not in loaded:
            if name == "pickscore":
                loaded[name] = pickscore_scorer(args.pickscore_model, args.pickscore_processor, args.device,
                                                dtype=args.pickscore_dtype,
                                                offload=args.pickscore_offload)
            elif name in ("geneval", "deqa"):
                url = getattr(args, f"{name}_url")
                if url is None:
                    raise loading.UserError(f"reward {name!r} on real images needs --{name}-url (a flow_grpo reward server)")
                post = server_client(url, args.reward_timeout, args.reward_retries)
                quality = args.jpeg_quality
                loaded[name] = (geneval_server_scorer(post, jpeg_quality=quality) if name == "geneval"
                                else deqa_server_scorer(post, jpeg_quality=quality))
        return loaded[name]

    def score(images, prompts, metadata=None, names=("geneval", "ocr", "quality")):
        check_names(names, "the rewards to score")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        metadata = metadata or [None] * len(prompts)
        local = tuple(n for n in names if is_miniature and n in miniature.world.REWARDS and not (n == "geneval" and args.geneval_url))
        out = miniature.world.score(images, prompts, metadata, names=local) if local else {}  # one pass for all of them
        for name in (n for n in names if n not in local):
            if name == "quality":
                raise loading.UserError("reward 'quality' is the miniature world's flat-colour score; on real images use 'deqa'")
            out.update({"ocr": ocr_rewards(images, prompts)} if name == "ocr" else scorer(name)(images, prompts, metadata))
        return out
    return score


# ----------------------------------------------------------------------------------------------
# OCR and PickScore, run in this process


def ocr_rewards(images, prompts):
    """docs/method.md M8 on real images: rapidocr detection + recognition, lines concatenated."""
    is_ocr = np.array([re.search(r'"[^"]*"', p) is not None for p in prompts])
    rewards = np.full(len(prompts), np.nan)
    if is_ocr.any():
        texts = miniature.world.ocr_read(images[torch.as_tensor(is_ocr)], mode="det")
        rewards[is_ocr] = [miniature.world.ocr_reward(t, p) for t, p in zip(texts, np.asarray(prompts)[is_ocr])]
    return rewards


def pickscore_scorer(model=PICKSCORE_MODEL, processor=PICKSCORE_PROCESSOR, device="cpu", batch_size=32, dtype="auto",
                     offload=False):
    """PickScore: logit_scale * cos(text, image) of a CLIP preference model, / 26 as a reward (docs/method.md M8).
    CLIP-H is ~1 B parameters: `dtype` "auto" loads it in fp16 on a GPU (~2 GB instead of ~4; the cosine is
    computed in fp32), and `offload` keeps it on the CPU except while it scores."""
    from transformers import AutoProcessor, CLIPModel
    dtype = (torch.float16 if torch.device(device).type == "cuda" else torch.float32) if dtype == "auto" \
        else getattr(torch, dtype)
    clip = CLIPModel.from_pretrained(model, dtype=dtype).eval().to("cpu" if offload else device)
    prep = AutoProcessor.from_pretrained(processor)

    @torch.no_grad()
    def score(images, prompts, metadata=None):
        if offload:
            clip.to(device)
        try:
            return {"pickscore": pickscore_values(images, prompts)}
        finally:
            if offload:
                clip.to("cpu")

    def pickscore_values(images, prompts):
        values = []
        for i in range(0, len(prompts), batch_size):
            pil = [Image.fromarray(a) for a in miniature.world.to_uint8(images[i:i + batch_size])]
            pixels = prep(images=pil, return_tensors="pt")["pixel_values"].to(device, dtype)
            text = prep(text=list(prompts[i:i + batch_size]), padding=True, truncation=True, max_length=77,
                        return_tensors="pt")
            image_emb = torch.nn.functional.normalize(features(clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
            text_emb = torch.nn.functional.normalize(features(clip.get_text_features(
                input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device))).float(), dim=-1)
            values.append(clip.logit_scale.float().exp() * (image_emb * text_emb).sum(-1) / 26)
        return torch.cat(values).cpu().numpy()
    score.model = clip  # for a caller that wants to see where it lives
    return score


def features(output):
    """CLIP's projected embeddings: a tensor, or (transformers 5) an output object holding them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ----------------------------------------------------------------------------------------------
# flow_grpo reward servers (GenEval, DeQA)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect becomes an HTTPError: we unpickle only what the given URL answers


def _plain_data_globals():
    """The only globals a reward server's reply may name: what pickle needs for builtins' containers and
    numbers and for numpy arrays and scalars (numpy 2's module names and numpy 1's, since a server may run
    either; protocols 0-2 name builtins `__builtin__` and bytes as `_codecs.encode`)."""
    from numpy._core import multiarray, numeric
    builtin = {"set": set, "frozenset": frozenset, "complex": complex, "bytearray": bytearray}
    allowed = {(module, name): value for module in ("builtins", "__builtin__") for name, value in builtin.items()}
    allowed[("_codecs", "encode")] = codecs.encode  # str -> bytes, nothing else
    allowed[("numpy", "ndarray")], allowed[("numpy", "dtype")] = np.ndarray, np.dtype
    for core in ("numpy._core", "numpy.core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


PLAIN_DATA_GLOBALS = _plain_data_globals()


class _PlainDataUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only PLAIN_DATA_GLOBALS: anything else (a function to call, a class to
    build) raises before it is looked up, so nothing it names is imported or run."""

    def find_class(self, module, name):
        if (module, name) not in PLAIN_DATA_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return PLAIN_DATA_GLOBALS[(module, name)]


def plain_data_loads(data, url):
    """pickle.loads of a reward server's reply, refusing any global outside the allow-list with a one-line
    UserError that names the server and what the reply asked for."""
    try:
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        raise loading.UserError(f"reward server {url} sent a reply that is not plain data (it names {err}); refused "
                                f"without running it: expected builtins' containers and numbers, numpy arrays and "
                                f"scalars, as flow_grpo's reward servers send") from None


def server_client(url, timeout=120.0, retries=3, backoff=1.0):
    """post(dict) -> dict with flow_grpo's pickle protocol. A connection error, timeout or 5xx is retried
    `retries` times with exponential backoff, then raises a clear error; a 4xx fails at once."""
    if not url.startswith(("http://", "https://")):
        raise loading.UserError(f"reward server URL {url!r} must start with http:// or https://")
    opener = urllib.request.build_opener(_RefuseRedirects)

    def post(payload):
        body, last = pickle.dumps(payload), None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=body, method="POST",
                                             headers={"Content-Type": "application/octet-stream"})
            try:
                with opener.open(request, timeout=timeout) as response:
                    return plain_data_loads(response.read(), url)
            except urllib.error.HTTPError as err:
                if err.code < 500:
                    raise loading.UserError(f"reward server {url} answered HTTP {err.code} ({err.reason}); expected a "
                                       f"flow_grpo reward server at this URL") from None
                last = f"HTTP {err.code} ({err.reason})"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        raise loading.UserError(f"reward server {url} failed {retries + 1} times (last: {last}); is the server running "
                           f"and reachable? (timeout {timeout} s per request, --reward-timeout/--reward-retries)")
    return post


def jpeg_bytes(images, quality=75):
    """The protocol's image format: one JPEG per image (flow_grpo saves with PIL's default quality, 75)."""
    out = []
    for array in miniature.world.to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


SERVER_GENEVAL_KEYS = {"scores": "geneval", "rewards": "geneval_acc", "strict_rewards": "geneval_strict"}


def geneval_server_scorer(post, batch_size=64, jpeg_quality=75):
    """GenEval on a flow_grpo server (reward-server app_geneval.py): `scores` (partial credit, the training
    reward) -> geneval, `rewards` (the official GenEval check, evaluate(): at least each count, exclude
    clauses; the paper's GenEval numbers) -> geneval_acc, `strict_rewards` (exact counts, evaluate_reward())
    -> geneval_strict. Prompts without GenEval metadata get NaN."""
    def score(images, prompts, metadata):
        judged = [i for i, m in enumerate(metadata) if m and "include" in m]
        out = {name: np.full(len(prompts), np.nan) for name in SERVER_GENEVAL_KEYS.values()}
        for start in range(0, len(judged), batch_size):
            idx = judged[start:start + batch_size]
            answer = post({"images": jpeg_bytes(images[idx], jpeg_quality), "meta_datas": [metadata[i] for i in idx],
                           "only_strict": False})
            for key, name in SERVER_GENEVAL_KEYS.items():
                out[name][idx] = checked(answer, key, len(idx))
        return out
    return score


def deqa_server_scorer(post, batch_size=64, jpeg_quality=75):
    """DeQA on a flow_grpo server: `outputs`, the model's 1-5 score already divided by 5 by the server
    (reward-server deqa.py: compute_deqascore returns score / 5) -> deqa, in [0.2, 1]."""
    def score(images, prompts, metadata):
        values = [checked(post({"images": jpeg_bytes(images[i:i + batch_size], jpeg_quality)}), "outputs",
                          len(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return {"deqa": np.concatenate(values)}
    return score


def checked(answer, key, n):
    """answer[key] as n floats, or a clear error naming what the server sent instead."""
    values = answer.get(key) if isinstance(answer, dict) else None
    try:
        values = None if values is None else np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = None
    if values is None or len(values) != n:
        got = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
        raise loading.UserError(f"reward server answer has no {n} numbers under {key!r} (got {got}); expected flow_grpo's protocol")
    return values
