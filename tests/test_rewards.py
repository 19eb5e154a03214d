"""The real world's scorers: PickScore on a tiny random CLIP, and the flow_grpo reward-server client
against a local HTTP server (a good answer, a server error, a timeout, a redirect)."""
import http.server
import io
import pickle
import threading
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import loading
import rewards


def test_pickscore_is_logit_scale_cosine_over_26(tiny_clip_dir):
    from transformers import AutoProcessor, CLIPModel
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", 'a sign that says "K7"', "two blue squares"]
    got = rewards.pickscore_scorer(tiny_clip_dir, tiny_clip_dir)(images, prompts)["pickscore"]
    # the reference: CLIP's own forward, whose logits_per_image is logit_scale * cos(image, text)
    clip, prep = CLIPModel.from_pretrained(tiny_clip_dir).eval(), AutoProcessor.from_pretrained(tiny_clip_dir)
    inputs = prep(text=prompts, images=[Image.fromarray(a) for a in
                                        (images.permute(0, 2, 3, 1) * 255).round().byte().numpy()],
                  padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = clip(**inputs).logits_per_image
    np.testing.assert_allclose(got, (logits.diag() / 26).numpy(), rtol=1e-5, atol=1e-6)
    assert got.shape == (3,) and np.ptp(got) > 0


def test_real_world_scorer_routes_names_and_rejects_what_it_cannot_score(tiny_clip_dir):
    args = types.SimpleNamespace(pickscore_model=tiny_clip_dir, pickscore_processor=tiny_clip_dir, geneval_url=None,
                                 deqa_url=None, reward_timeout=1.0, reward_retries=0, device="cpu",
                                 pickscore_dtype="auto", pickscore_offload=False, jpeg_quality=75)
    score = rewards.make_scorer(args, types.SimpleNamespace(kind="sd3"))
    images = torch.ones(2, 3, 64, 64)  # blank: OCR reads nothing
    out = score(images, ["a red circle", 'a sign that says "K7"'], None, names=("ocr", "pickscore"))
    assert np.isnan(out["ocr"][0]) and out["ocr"][1] == 0.0 and np.isfinite(out["pickscore"]).all()
    with pytest.raises(ValueError, match="--geneval-url"):
        score(images, ["a", "b"], None, names=("geneval",))
    with pytest.raises(ValueError, match="'quality' is the miniature"):
        score(images, ["a", "b"], None, names=("quality",))
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'"):
        score(images, ["a", "b"], None, names=("aesthetic",))


class _Server:
    """A flow_grpo-style reward server on 127.0.0.1 whose behaviour each test sets."""

    def __init__(self, handle):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                owner.requests.append(pickle.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body = handle(owner.requests[-1], len(owner.requests))
                self.send_response(status)
                if status in (301, 302, 307):
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except BrokenPipeError:  # the client gave up (the timeout test)
                    pass

            def log_message(self, *args):
                pass
        self.requests = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_geneval_server_good_answer_roundtrips_jpegs_and_metadata():
    def handle(request, n):
        sizes = [Image.open(io.BytesIO(b)).size for b in request["images"]]
        assert sizes == [(32, 32)] * len(request["images"]) and request["only_strict"] is False
        scores = [0.25 * len(m["include"]) for m in request["meta_datas"]]
        return 200, pickle.dumps({"scores": scores, "rewards": scores, "strict_rewards": [1.0] * len(scores),
                                  "group_rewards": {}, "group_strict_rewards": {}})
    server = _Server(handle)
    try:
        score = rewards.geneval_server_scorer(rewards.server_client(server.url, timeout=5, retries=0), batch_size=2)
        metas = [{"tag": "two_object", "include": [{"class": "circle"}, {"class": "square"}]}, None,
                 {"tag": "single_object", "include": [{"class": "circle"}]}, {"tag": "colors", "include": [{}]}]
        out = score(torch.rand(4, 3, 32, 32), ["p"] * 4, metas)
    finally:
        server.close()
    np.testing.assert_array_equal(out["geneval"], [0.5, np.nan, 0.25, 0.25])
    np.testing.assert_array_equal(out["geneval_acc"], [0.5, np.nan, 0.25, 0.25])
    np.testing.assert_array_equal(out["geneval_strict"], [1.0, np.nan, 1.0, 1.0])
    assert [len(r["images"]) for r in server.requests] == [2, 1]  # batches of judged prompts only


def test_deqa_server_error_is_retried_then_answered_and_scaled():
    server = _Server(lambda request, n: (500, b"busy") if n == 1 else
                     (200, pickle.dumps({"outputs": [4.0 / 5] * len(request["images"])})))  # the server's score / 5
    try:
        score = rewards.deqa_server_scorer(rewards.server_client(server.url, timeout=5, retries=2, backoff=0.01))
        out = score(torch.rand(3, 3, 16, 16), ["a", "b", "c"], [None] * 3)
    finally:
        server.close()
    np.testing.assert_allclose(out["deqa"], [0.8, 0.8, 0.8])
    assert len(server.requests) == 2


def test_server_errors_timeouts_redirects_and_unreachable_give_clear_errors():
    server = _Server(lambda request, n: (500, b"boom"))
    try:
        post = rewards.server_client(server.url, timeout=5, retries=2, backoff=0.01)
        with pytest.raises(loading.UserError, match=r"failed 3 times \(last: HTTP 500"):
            post({"images": []})
        assert len(server.requests) == 3
    finally:
        server.close()
    slow = _Server(lambda request, n: (time.sleep(1.5), (200, pickle.dumps({"outputs": []})))[1])
    try:
        with pytest.raises(loading.UserError, match="failed 2 times .*timeout 0.3 s"):
            rewards.server_client(slow.url, timeout=0.3, retries=1, backoff=0.01)({"images": []})
    finally:
        slow.close()
    moved = _Server(lambda request, n: (302, b""))
    try:
        with pytest.raises(loading.UserError, match="HTTP 302"):
            rewards.server_client(moved.url, timeout=5, retries=0)({"images": []})
    finally:
        moved.close()
    bad = _Server(lambda request, n: (200, pickle.dumps({"wrong": 1})))
    try:
        with pytest.raises(loading.UserError, match="no 1 numbers under 'outputs'"):
            rewards.deqa_server_scorer(rewards.server_client(bad.url, timeout=5, retries=0))(torch.rand(1, 3, 8, 8), ["a"], [None])
    finally:
        bad.close()
    with pytest.raises(loading.UserError, match="is the server running"):
        rewards.server_client("http://127.0.0.1:9", timeout=1, retries=0)({"images": []})
    with pytest.raises(ValueError, match="must start with http"):
        rewards.server_client("127.0.0.1:18085")


class _RunsCode:
    """A payload whose unpickling calls a function: pickle would run os.system-like code through __reduce__."""
    ran = []

    def __reduce__(self):
        return (_RunsCode.ran.append, ("the server's code ran",))


def test_a_reply_that_would_call_a_function_is_refused_and_nothing_runs():
    hostile = _Server(lambda request, n: (200, pickle.dumps({"outputs": [0.5], "x": _RunsCode()})))
    try:
        with pytest.raises(loading.UserError) as err:
            rewards.server_client(hostile.url, timeout=5, retries=0)({"images": []})
    finally:
        hostile.close()
    message = str(err.value)
    assert "\n" not in message and hostile.url in message and "not plain data" in message and "builtins.getattr" in message
    assert _RunsCode.ran == []
    for name in ("os.system", "builtins.eval", "builtins.getattr", "subprocess.Popen", "numpy.load"):
        module, attr = name.rsplit(".", 1)  # a hand-made GLOBAL + REDUCE pickle: module.attr("x")
        payload = f"c{module}\n{attr}\n(S'x'\ntR.".encode()
        with pytest.raises(loading.UserError, match=f"it names {module}.{attr}"):
            rewards.plain_data_loads(payload, "http://server")


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_every_key_the_real_servers_send_still_decodes(protocol):
    # flow_grpo's GenEval server: lists of floats and per-tag dicts; DeQA / PickScore servers: numpy arrays, scalars
    geneval = {"scores": [0.5, 1.0], "rewards": [1.0, 0.0], "strict_rewards": [0.0, 0.0],
               "group_rewards": {"counting": [1.0]}, "group_strict_rewards": {"counting": [0.0]}}
    deqa = {"outputs": np.array([0.8, 0.6], dtype=np.float32), "mean": np.float64(0.7), "n": np.int64(2),
            "ok": np.bool_(True), "grid": np.asfortranarray(np.ones((2, 3), dtype=np.float16)),
            "misc": (1, 2.5, 1 + 2j, None, True, b"jpeg", bytearray(b"x"), {1, 2}, frozenset({3}), "text")}
    for reply in (geneval, deqa):
        decoded = rewards.plain_data_loads(pickle.dumps(reply, protocol=protocol), "http://server")
        assert decoded.keys() == reply.keys()
        for key, value in reply.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(decoded[key], value)
                assert decoded[key].dtype == value.dtype
            else:
                assert decoded[key] == value and type(decoded[key]) is type(value)
