"""CPU demonstration of audio- and video-conditioned adapters (issue #17) on synthetic questions.

Two tasks whose questions only the clip can answer:
- audio: 1 s WAV clips of 1-3 sine notes, low (200-320 Hz) or high (1.2-2 kHz), quiet or loud. Questions: "Is
  the pitch high or low?", "Is the sound loud or quiet?", "How many notes are played?" (answers: high / low,
  loud / quiet, one / two / three).
- video: 8-frame MPEG-4 clips (32x32) of a white square that starts at the centre and moves towards one edge.
  Question: "Which way does the square move?" (left / right / up / down). The frames' features are pooled over
  time (mean): the order of the frames is gone, so the direction is readable only as the side of the frame the
  square spends its time in — which is why it starts at the centre.
Encoders, pre-trained here in seconds on *separate* random clips (never the QA records) and then frozen:
- a tiny Whisper encoder (2 layers, width 64, 40 mel bins, 1 s window) trained to regress each clip's
  generating factors (log pitch, level in dB, note count) from its mean-pooled states;
- a tiny CLIP vision tower (2 layers, width 64, patch 8) trained to regress the square's position in a frame.
For each task and each of 3 seeds, two adapters are trained on the same questions with the same settings: a
text-only one, and one conditioned on the clip (`finetune --audio-encoder` / `--image-encoder` with "video"
records). Greedy answers on held-out clips; accuracy = the first word of the answer equals the reference.
Reported as mean ± std over the seeds.

    python benchmarks/multimodal_av_demo.py --quick --out runs/multimodal_av_demo

Uses the built-in base when it is installed, else a tiny random checkpoint (tests/tiny.py).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
AUDIO_QUESTIONS = {
    "pitch": "Is the pitch high or low?",
    "level": "Is the sound loud or quiet?",
    "count": "How many notes are played?",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


# ---- synthetic audio -----------------------------------------------------------------------------------------
def audio_clip(rng: random.Random) -> tuple[np.ndarray, dict[str, Any]]:
    """1 s of 1-3 notes of one pitch band and one level; returns (samples, factors)."""
    high, loud, count = rng.random() < 0.5, rng.random() < 0.5, rng.randint(1, 3)
    amp = rng.uniform(0.4, 0.8) if loud else rng.uniform(0.02, 0.06)
    x = np.zeros(RATE, np.float32)
    slot = RATE // count
    freqs = []
    for k in range(count):
        f = rng.uniform(1200, 2000) if high else rng.uniform(200, 320)
        freqs.append(f)
        n = int(slot * 0.6)
        t = np.arange(n) / RATE
        env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms ramps: clean onsets, no clicks
        start = k * slot + int(slot * 0.2)
        x[start : start + n] = amp * env * np.sin(2 * np.pi * f * t)
    factors = {"high": high, "loud": loud, "count": count, "log_pitch": float(np.log2(np.mean(freqs)))}
    factors["level_db"] = float(20 * np.log10(amp))
    return x, factors


def audio_answer(kind: str, f: dict[str, Any]) -> str:
    if kind == "pitch":
        return "high" if f["high"] else "low"
    if kind == "level":
        return "loud" if f["loud"] else "quiet"
    return COUNT_WORDS[f["count"]]


def write_audio_task(out: Path, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    import soundfile as sf

    rng = random.Random(seed)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            x, f = audio_clip(rng)
            name = f"clips/{split}_{i:04d}.wav"
            sf.write(str(out / name), x, RATE)
            kind = rng.choice(list(AUDIO_QUESTIONS))
            splits[split].append(
                {
                    "id": f"{split}{i}",
                    "instruction": AUDIO_QUESTIONS[kind],
                    "input": "",
                    "output": audio_answer(kind, f),
                    "audio": str(out / name),
                    "kind": kind,
                }
            )
    return splits["train"], splits["test"]


def make_whisper(path: Path, seed: int, steps: int) -> tuple[Path, float]:
    """A tiny Whisper, pre-trained to regress (log pitch, level dB, count) of random clips; returns (dir, r2)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(seed)
    fe = WhisperFeatureExtractor(feature_size=40, sampling_rate=RATE, hop_length=160, chunk_length=1, n_fft=400)
    cfg = WhisperConfig(
        num_mel_bins=40,
        d_model=64,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=50,
        max_target_positions=8,
        vocab_size=16,
        pad_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    model = WhisperModel(cfg)
    enc = model.get_encoder()
    rng = random.Random(seed + 1000)  # not the QA clips

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        clips = [audio_clip(rng) for _ in range(n)]
        feats = fe([c for c, _ in clips], sampling_rate=RATE, return_tensors="pt").input_features
        y = torch.tensor([[f["log_pitch"] - 9.5, f["level_db"] / 20 + 1, f["count"] - 2.0] for _, f in clips])
        return feats, y

    head = torch.nn.Linear(64, 3)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=2e-3)
    enc.train()
    for _ in range(steps):
        x, y = batch(32)
        loss = torch.nn.functional.mse_loss(head(enc(x).last_hidden_state.mean(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        x, y = batch(128)
        pred = head(enc(x).last_hidden_state.mean(1))
        r2 = float(1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    model.eval().save_pretrained(path)
    fe.save_pretrained(path)
    return path, r2


# ---- synthetic video -----------------------------------------------------------------------------------------
def square_frame(x: float, y: float, size: int = 32, side: int = 8) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8) + 30
    x0, y0 = int(round(x - side / 2)), int(round(y - side / 2))
    img[max(0, y0) : max(0, y0 + side), max(0, x0) : max(0, x0 + side)] = 230
    return img


def write_video(path: Path, direction: str, rng: random.Random, frames: int = 8) -> None:
    import av

    dx, dy = DIRECTIONS[direction]
    x, y = 16 + rng.uniform(-2, 2), 16 + rng.uniform(-2, 2)
    speed = rng.uniform(1.2, 1.6)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            img = square_frame(x + dx * speed * k, y + dy * speed * k)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_video_task(out: Path, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            d = rng.choice(list(DIRECTIONS))
            name = out / "clips" / f"{split}_{i:04d}.mp4"
            write_video(name, d, rng)
            splits[split].append(
                {
                    "id": f"{split}{i}",
                    "instruction": "Which way does the square move?",
                    "input": "",
                    "output": d,
                    "video": str(name),
                    "kind": "direction",
                }
            )
    return splits["train"], splits["test"]


def make_clip(path: Path, seed: int, steps: int) -> tuple[Path, float]:
    """A tiny CLIP vision tower, pre-trained to regress the square's centre in single random frames."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    model = CLIPVisionModelWithProjection(cfg)
    rng = random.Random(seed + 2000)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = [(rng.uniform(4, 28), rng.uniform(4, 28)) for _ in range(n)]
        imgs = np.stack([square_frame(x, y) for x, y in pos]).astype(np.float32) / 255
        px = (torch.from_numpy(imgs).permute(0, 3, 1, 2) - mean) / std
        return px, torch.tensor(pos) / 16 - 1

    head = torch.nn.Linear(32, 2)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    model.train()
    for _ in range(steps):
        x, y = batch(32)
        loss = torch.nn.functional.mse_loss(head(model(pixel_values=x).image_embeds), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x, y = batch(128)
        pred = head(model(pixel_values=x).image_embeds)
        r2 = float(1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    model.save_pretrained(path)
    pre = {
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean.flatten().tolist(),
        "image_std": std.flatten().tolist(),
        "resample": 3,
        "do_convert_rgb": True,
        "image_processor_type": "CLIPImageProcessor",
    }
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    return path, r2


# ---- training and evaluation ---------------------------------------------------------------------------------
def first_word(text: str) -> str:
    m = re.search(r"[a-z]+", text.lower())
    return m.group(0) if m else ""


def run_one(
    base: str,
    out: Path,
    train_recs: list[dict],
    test_recs: list[dict],
    seed: int,
    args: argparse.Namespace,
    encoders: dict[str, str] | None,
) -> dict[str, Any]:
    import llama_adapter as la
    from llama_adapter.eval.answering import Item, answer_items
    from llama_adapter.multimodal.modalities import AdapterEncoders
    from llama_adapter.training.config import TrainConfig
    from llama_adapter.training.loop import train

    media = ("audio", "video")
    rows = (
        [dict(r) for r in train_recs]
        if encoders
        else [{k: v for k, v in r.items() if k not in media} for r in train_recs]
    )
    cfg = TrainConfig(
        base=base,
        out=str(out),
        template="plain",
        epochs=args.epochs,
        warmup_epochs=1,
        batch_size=8,
        micro_batch=8,
        lr=args.lr,
        prompt_length=10,
        dtype="float32",
        seed=seed,
        progress=False,
        overwrite=True,
        image_encoder=(encoders or {}).get("image"),
        audio_encoder=(encoders or {}).get("audio"),
        video_frames=8,
        feature_cache=str(out.parent / "feature_cache") if encoders else None,
    )
    t = time.time()
    res = train(cfg, model=la.load_model(base, dtype=torch.float32), records=rows)
    model = la.load_model(base, dtype=torch.float32)
    model.load_adapter(res.adapter_path, "demo")
    items = [Item(r["id"], r["instruction"], {m: r[m] for m in media if m in r} if encoders else {}) for r in test_recs]
    answers = answer_items(
        model,
        "demo",
        items,
        template="plain",
        encoders=AdapterEncoders() if encoders else None,
        batch_size=32,
        max_new_tokens=4,
    )
    correct = [first_word(a) == r["output"] for a, r in zip(answers, test_recs, strict=True)]
    by_kind: dict[str, list[bool]] = {}
    for c, r in zip(correct, test_recs, strict=True):
        by_kind.setdefault(r["kind"], []).append(c)
    return {
        "accuracy": 100.0 * sum(correct) / len(correct),
        "by_question": {k: 100.0 * sum(v) / len(v) for k, v in by_kind.items()},
        "n_trainable": res.n_trainable,
        "steps": res.steps,
        "final_train_loss": res.final_train_loss,
        "seconds": round(time.time() - t, 1),
        "examples": [
            {"q": r["instruction"], "ref": r["output"], "answer": a}
            for r, a in list(zip(test_recs, answers, strict=True))[:3]
        ],
    }


def write_records(path: Path, recs: list[dict], root: Path) -> None:
    """The records as JSONL with paths relative to the file's folder (what `finetune --data` resolves)."""
    with path.open("w") as f:
        for r in recs:
            row = {k: (str(Path(v).relative_to(root)) if k in ("audio", "video") else v) for k, v in r.items()}
            f.write(json.dumps(row) + "\n")


def prior_accuracy(train_recs: list[dict], test_recs: list[dict]) -> float:
    """Accuracy of always giving the training set's most frequent answer to each question: the best a text-only
    adapter can do."""
    best: dict[str, str] = {}
    for q in {r["instruction"] for r in train_recs}:
        outs = [r["output"] for r in train_recs if r["instruction"] == q]
        best[q] = max(set(outs), key=outs.count)
    return 100.0 * sum(best.get(r["instruction"]) == r["output"] for r in test_recs) / len(test_recs)


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/multimodal_av_demo")
    ap.add_argument("--base", default="builtin", help="'builtin' (falls back to a tiny base), 'tiny', or a dir")
    ap.add_argument("--quick", action="store_true", help="half the clips and pre-training steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=["audio", "video"], choices=["audio", "video"])
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes: dict[str, Any] = (
        dict(audio=(400, 150), video=(320, 120), pre=400, epochs=15)
        if args.quick
        else dict(audio=(800, 300), video=(640, 240), pre=800, epochs=15)
    )
    args.epochs = sizes["epochs"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from multimodal_demo import resolve_base  # type: ignore[import-not-found]

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, base_label = resolve_base(args.base, out)
    print(f"base: {base_label}; mode: {'quick' if args.quick else 'full'}; seeds {args.seeds}", flush=True)
    summary: dict[str, Any] = {"base": base_label, "args": vars(args), "sizes": sizes, "tasks": {}}
    for task in args.tasks:
        t = time.time()
        d = out / task
        if task == "audio":
            train_recs, test_recs = write_audio_task(d, *sizes["audio"], seed=100)
            enc_dir, r2 = make_whisper(d / "whisper", seed=0, steps=sizes["pre"])
            encoders = {"audio": str(enc_dir)}
            enc_label = "tiny Whisper encoder (2 layers, width 64), pre-trained to regress pitch / level / count"
        else:
            train_recs, test_recs = write_video_task(d, *sizes["video"], seed=200)
            enc_dir, r2 = make_clip(d / "clip", seed=0, steps=sizes["pre"])
            encoders = {"image": str(enc_dir)}
            enc_label = "tiny CLIP vision tower (2 layers, width 64), pre-trained to regress the square's position"
        prep = time.time() - t
        print(
            f"{task}: {len(train_recs)} train / {len(test_recs)} test; encoder pre-training R^2 {r2:.3f} "
            f"({prep:.0f}s with the data)",
            flush=True,
        )
        for split, recs in (("train", train_recs), ("test", test_recs)):  # for the CLI examples of the docs
            write_records(d / f"{split}.jsonl", recs, d)
        runs: dict[str, list[dict]] = {"text-only": [], "conditioned": []}
        for seed in args.seeds:
            for name, encs in (("text-only", None), ("conditioned", encoders)):
                r = run_one(base, d / f"{name}-seed{seed}", train_recs, test_recs, seed, args, encs)
                runs[name].append(r)
                print(
                    f"  {task} {name} seed {seed}: {r['accuracy']:.1f}% ({r['steps']} steps, {r['seconds']:.0f}s)",
                    flush=True,
                )
        summary["tasks"][task] = {
            "encoder": enc_label,
            "encoder_pretraining_r2": r2,
            "n_train": len(train_recs),
            "n_test": len(test_recs),
            "majority_prior_accuracy": prior_accuracy(train_recs, test_recs),
            "runs": runs,
        }
    summary["total_seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print()
    print("| task | test questions | text-only adapter | conditioned adapter | majority prior |")
    print("|---|---|---|---|---|")
    for task, s in summary["tasks"].items():
        text = mean_std([r["accuracy"] for r in s["runs"]["text-only"]])
        cond = mean_std([r["accuracy"] for r in s["runs"]["conditioned"]])
        print(f"| {task} | {s['n_test']} | {text} | {cond} | {s['majority_prior_accuracy']:.1f} |")
    for task, s in summary["tasks"].items():
        kinds = sorted({k for r in s["runs"]["conditioned"] for k in r["by_question"]})
        if len(kinds) > 1:
            for k in kinds:
                text = mean_std([r["by_question"][k] for r in s["runs"]["text-only"]])
                cond = mean_std([r["by_question"][k] for r in s["runs"]["conditioned"]])
                print(f"  {task} / {k}: text-only {text}, conditioned {cond}")
    print(
        f"\naccuracy in %, mean ± std over seeds {args.seeds}; total {time.time() - t0:.0f}s; "
        f"results in {out / 'results.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
