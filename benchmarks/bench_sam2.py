"""Speed of segsem's SAM2 path: layout-prompted inference and fine-tuning steps.

Random weights (speed does not depend on them), synthetic images with
``--prompts`` box prompts each. Inference = one image embedding + all prompts
decoded in batches + contours (what the backbone plugin does per image).
Fine-tuning step = one image, ``--objects`` prompts, loss, backward, AdamW
(``encoders`` mode unless ``--train``). On CUDA the model runs under bf16 autocast.

    OMP_NUM_THREADS=2 python benchmarks/bench_sam2.py --config sam2.1_hiera_t --sizes 1024 512

Prints a table (images/s, steps/s and the parts of an inference pass).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def synth(n: int, prompts: int, seed: int = 0):
    """An n x n grey image with a grid of bright rectangles, their labels and boxes."""
    rng = np.random.default_rng(seed)
    img = rng.normal(60, 4, (n, n)).astype(np.float32)
    label = np.zeros((n, n), np.int32)
    k = int(np.ceil(np.sqrt(prompts)))
    pitch = n / k
    boxes = []
    for i in range(prompts):
        r, c = divmod(i, k)
        v0, u0 = int(r * pitch + pitch * 0.25), int(c * pitch + pitch * 0.25)
        v1, u1 = int(r * pitch + pitch * 0.75), int(c * pitch + pitch * 0.75)
        img[v0:v1, u0:u1] += 100
        label[v0:v1, u0:u1] = i + 1
        boxes.append((u0 - 3.0, v0 - 3.0, u1 + 3.0, v1 + 3.0))
    return img, label, boxes


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_inference(model, size: int, prompts: int, reps: int, dev):
    from segsem_cli.sam.predict import (View, _contours, autocast_for, decode_prompts, image_features, model_input,
                                        normalize_image, predict_boxes)

    img, _, boxes = synth(size, prompts)
    predict_boxes(model, img, boxes[:2])  # warm-up
    t_total = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        preds = predict_boxes(model, img, boxes)
        sync(dev)
        t_total.append(time.perf_counter() - t0)
    assert len(preds) == prompts
    # parts, measured separately
    view = View(0, 0, size, size, int(model.image_size))
    x01 = torch.from_numpy(normalize_image(img)).to(dev)
    with torch.inference_mode(), autocast_for(dev):
        sync(dev)
        t0 = time.perf_counter()
        feats = image_features(model, model_input(x01, [view]))
        sync(dev)
        t_embed = time.perf_counter() - t0
        bx = torch.tensor(np.array([view.to_model(np.reshape(b, (2, 2))).ravel() for b in boxes]), dtype=torch.float32, device=dev)
        t0 = time.perf_counter()
        logits = torch.cat([decode_prompts(model, feats, 0, bx[s:s + 32])[0] for s in range(0, len(boxes), 32)])
        sync(dev)
        t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    for j, b in enumerate(boxes):
        _contours(logits[j, 0].float(), view, b, None)
    t_contours = time.perf_counter() - t0
    # contours of clean masks (what a trained model gives): logits = signed distance to each rectangle
    L = logits.shape[-1]
    cu = (np.arange(L) + 0.5) * size / L
    t_clean = 0.0
    for b in boxes:
        u0, v0, u1, v1 = b[0] + 3, b[1] + 3, b[2] - 3, b[3] - 3
        du = np.minimum(cu - u0, u1 - cu)
        dv = np.minimum(cu - v0, v1 - cu)
        sd = torch.tensor(np.clip(np.minimum(dv[:, None], du[None, :]), -20, 20), dtype=torch.float32)
        t0 = time.perf_counter()
        _contours(sd, view, b, None)
        t_clean += time.perf_counter() - t0
    return min(t_total), t_embed, t_decode, t_contours, t_clean


def bench_train(model, size: int, objects: int, steps: int, train: str, dev):
    from segsem_cli.sam.train import batch_loss, make_sample, make_train_view, select_trainable, _set_train_mode

    img, label, _ = synth(size, max(objects, 16))
    sample = make_sample("bench", img, label)
    select_trainable(model, train)
    _set_train_mode(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    rng = np.random.default_rng(0)
    times = []
    for i in range(steps + 1):
        view = make_train_view(sample, rng, tile_px=size, objects_per_image=objects)
        sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = batch_loss(model, [view])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync(dev)
        if i:  # first step is warm-up
            times.append(time.perf_counter() - t0)
    model.eval()
    return float(np.median(times)), sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="sam2.1_hiera_t")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--objects", type=int, default=8, help="prompts per fine-tuning step")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--train", default="encoders")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from segsem_cli.sam.model import build_model, parse_device

    dev = parse_device(args.device)
    threads = torch.get_num_threads()
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        model = build_model(args.config, image_size=size, device=dev)
        total, embed, decode, contours, clean = bench_inference(model, size, args.prompts, args.reps, dev)
        step, ntrain = bench_train(model, size, args.objects, args.train_steps, args.train, dev)
        rows.append((size, total, embed, decode, contours, clean, step, ntrain))
        del model
    where = f"{dev.type}" + (f" ({torch.cuda.get_device_name(dev)}, bf16)" if dev.type == "cuda" else f" ({threads} threads)")
    print(f"\nSAM2 {args.config}, random weights, {where}; {args.prompts} box prompts per image; "
          f"fine-tuning: {args.objects} prompts/step, train={args.train}")
    print("(contours: of the random model's noisy masks, a worst case; clean: of clean rectangle masks, as a trained model gives)")
    print(f"| size | images/s | s/image | embed s | decode s ({args.prompts} prompts) | contours s | contours s, clean | "
          "train steps/s | s/step | trainable params |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, total, embed, decode, contours, clean, step, ntrain in rows:
        print(f"| {size} | {1 / total:.3f} | {total:.2f} | {embed:.2f} | {decode:.2f} | {contours:.2f} | {clean:.2f} | "
              f"{1 / step:.3f} | {step:.2f} | {ntrain:,} |")


if __name__ == "__main__":
    main()
