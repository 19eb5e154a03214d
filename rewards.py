"""The rewards (METHOD.md §8), one API for both worlds:

    score = rewards.make_scorer(args, bundle)         # from the flags of rewards.add_arguments
    score(images, prompts, metadata, names) -> {name: float array}    # images (B, 3, H, W) in [0, 1]

A reward is NaN for a prompt it does not judge (an OCR prompt has no GenEval score).
- miniature world (toy.py): `geneval` (a detector on flat-colour scenes), `ocr` (rapidocr, recognition
  only on one-line 64 px images), `quality` (the flat-colour stand-in for DeQA);
- real world: `ocr` (rapidocr, detection + recognition), `pickscore` (a CLIP preference model,
  logit_scale * cos / 26), `geneval` and `deqa` (clients of flow_grpo's reward servers; DeQA / 5).

The reward servers speak flow_grpo's protocol: a POST whose body is a pickled dict of JPEG bytes, and a
pickled dict back. Unpickling runs code chosen by whoever answers, so the client talks only to the URL
the user gives (redirects are refused) and never to a default address.
"""
import io
import pickle
import re
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image

import common
import toy_world
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
        raise common.UserError(f"unknown reward {unknown[0]!r} in {where}; expected names from {list(NAMES)}")


def make_scorer(args, bundle):
    """score(images, prompts, metadata, names) for this model's world; real scorers load on first use."""
    miniature = bundle.kind == "miniature"
    loaded = {}

    def scorer(name):
        if name not in loaded:
            if name == "pickscore":
                loaded[name] = pickscore_scorer(args.pickscore_model, args.pickscore_processor, args.device)
            elif name in ("geneval", "deqa"):
                url = getattr(args, f"{name}_url")
                if url is None:
                    raise common.UserError(f"reward {name!r} on real images needs --{name}-url (a flow_grpo reward server)")
                post = server_client(url, args.reward_timeout, args.reward_retries)
                loaded[name] = geneval_server_scorer(post) if name == "geneval" else deqa_server_scorer(post)
        return loaded[name]

    def score(images, prompts, metadata=None, names=("geneval", "ocr", "quality")):
        check_names(names, "the rewards to score")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        metadata = metadata or [None] * len(prompts)
        local = tuple(n for n in names if miniature and n in toy_world.REWARDS and not (n == "geneval" and args.geneval_url))
        out = toy_world.score(images, prompts, metadata, names=local) if local else {}  # one pass for all of them
        for name in (n for n in names if n not in local):
            if name == "quality":
                raise common.UserError("reward 'quality' is the miniature world's flat-colour score; on real images use 'deqa'")
            out.update({"ocr": ocr_rewards(images, prompts)} if name == "ocr" else scorer(name)(images, prompts, metadata))
        return out
    return score


# ----------------------------------------------------------------------------------------------
# OCR and PickScore, run in this process


def ocr_rewards(images, prompts):
    """METHOD.md §8 on real images: rapidocr detection + recognition, lines concatenated."""
    is_ocr = np.array([re.search(r'"[^"]*"', p) is not None for p in prompts])
    rewards = np.full(len(prompts), np.nan)
    if is_ocr.any():
        texts = toy_world.ocr_read(images[torch.as_tensor(is_ocr)], mode="det")
        rewards[is_ocr] = [toy_world.ocr_reward(t, p) for t, p in zip(texts, np.asarray(prompts)[is_ocr])]
    return rewards


def pickscore_scorer(model=PICKSCORE_MODEL, processor=PICKSCORE_PROCESSOR, device="cpu", batch_size=32):
    """PickScore: logit_scale * cos(text, image) of a CLIP preference model, / 26 as a reward (METHOD.md §8)."""
    from transformers import AutoProcessor, CLIPModel
    clip = CLIPModel.from_pretrained(model).eval().to(device)
    prep = AutoProcessor.from_pretrained(processor)

    @torch.no_grad()
    def score(images, prompts, metadata=None):
        values = []
        for i in range(0, len(prompts), batch_size):
            pil = [Image.fromarray(a) for a in toy_world.to_uint8(images[i:i + batch_size])]
            pixels = prep(images=pil, return_tensors="pt")["pixel_values"].to(device)
            text = prep(text=list(prompts[i:i + batch_size]), padding=True, truncation=True, max_length=77,
                        return_tensors="pt")
            image_emb = torch.nn.functional.normalize(features(clip.get_image_features(pixel_values=pixels)), dim=-1)
            text_emb = torch.nn.functional.normalize(features(clip.get_text_features(
                input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device))), dim=-1)
            values.append(clip.logit_scale.exp() * (image_emb * text_emb).sum(-1) / 26)
        return {"pickscore": torch.cat(values).float().cpu().numpy()}
    return score


def features(output):
    """CLIP's projected embeddings: a tensor, or (transformers 5) an output object holding them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ----------------------------------------------------------------------------------------------
# flow_grpo reward servers (GenEval, DeQA)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect becomes an HTTPError: we unpickle only what the given URL answers


def server_client(url, timeout=120.0, retries=3, backoff=1.0):
    """post(dict) -> dict with flow_grpo's pickle protocol. A connection error, timeout or 5xx is retried
    `retries` times with exponential backoff, then raises a clear error; a 4xx fails at once."""
    if not url.startswith(("http://", "https://")):
        raise common.UserError(f"reward server URL {url!r} must start with http:// or https://")
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
                    return pickle.loads(response.read())
            except urllib.error.HTTPError as err:
                if err.code < 500:
                    raise common.UserError(f"reward server {url} answered HTTP {err.code} ({err.reason}); expected a "
                                       f"flow_grpo reward server at this URL") from None
                last = f"HTTP {err.code} ({err.reason})"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        raise common.UserError(f"reward server {url} failed {retries + 1} times (last: {last}); is the server running "
                           f"and reachable? (timeout {timeout} s per request, --reward-timeout/--reward-retries)")
    return post


def jpeg_bytes(images):
    """The protocol's image format: one JPEG (quality 95) per image."""
    out = []
    for array in toy_world.to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def geneval_server_scorer(post, batch_size=64):
    """GenEval on a flow_grpo server: `scores` (partial credit, the training reward) -> geneval,
    `strict_rewards` (GenEval correctness) -> geneval_strict; prompts without GenEval metadata get NaN."""
    def score(images, prompts, metadata):
        judged = [i for i, m in enumerate(metadata) if m and "include" in m]
        partial, strict = np.full(len(prompts), np.nan), np.full(len(prompts), np.nan)
        for start in range(0, len(judged), batch_size):
            idx = judged[start:start + batch_size]
            answer = post({"images": jpeg_bytes(images[idx]), "meta_datas": [metadata[i] for i in idx],
                           "only_strict": False})
            partial[idx], strict[idx] = checked(answer, "scores", len(idx)), checked(answer, "strict_rewards", len(idx))
        return {"geneval": partial, "geneval_strict": strict}
    return score


def deqa_server_scorer(post, batch_size=64):
    """DeQA on a flow_grpo server: `outputs` (a 1-5 quality score per image) / 5 -> deqa."""
    def score(images, prompts, metadata):
        values = [checked(post({"images": jpeg_bytes(images[i:i + batch_size])}), "outputs",
                          len(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return {"deqa": np.concatenate(values) / 5}
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
        raise common.UserError(f"reward server answer has no {n} numbers under {key!r} (got {got}); expected flow_grpo's protocol")
    return values
