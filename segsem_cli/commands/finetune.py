"""``segsem finetune``: fine-tune SAM2 on labelled SEM images (SegSEM: train the encoders)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import SegsemError


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune(
        dataset: Path = typer.Argument(..., help="Training manifest CSV with a 'label' column (instance masks: 0 = background, 1..N = objects)."),
        out: Path = typer.Option(..., "--out", "-o", help="Model file to write (.pt); also writes <stem>.log.csv and <stem>.resume.pt."),
        config: Optional[str] = typer.Option(None, "--config", "-c", help="SAM2 config: sam2.1_hiera_t|s|b+|l, sam2_hiera_*, segsem-micro, or a YAML path (default: the checkpoint's)."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Starting weights: official SAM2 .pt or a segsem model (default: random init)."),
        train: str = typer.Option("encoders", "--train", help="What trains: encoders (image + prompt encoder), decoder, full, or a comma list of modules."),
        val: Optional[Path] = typer.Option(None, "--val", help="Validation manifest (default: a seeded split of the dataset)."),
        val_fraction: float = typer.Option(0.2, "--val-fraction", min=0.0, max=0.9, help="Share of images held out for validation when --val is not given."),
        epochs: int = typer.Option(20, "--epochs", min=1, help="Passes over the training images."),
        lr: float = typer.Option(1e-5, "--lr", min=0.0, help="Peak learning rate (AdamW, warm-up then cosine)."),
        batch: int = typer.Option(2, "--batch", min=1, help="Images per step (each with up to --objects prompts)."),
        objects: int = typer.Option(8, "--objects", min=1, help="Objects prompted per image per step."),
        image_size: Optional[int] = typer.Option(None, "--image-size", help="Model input size, multiple of 32 (default: checkpoint's or config's, 1024 for official configs)."),
        box_margin_px: float = typer.Option(3.0, "--box-margin-px", min=0.0, help="Padding of prompt boxes (px), as used at inference."),
        seed: int = typer.Option(0, "--seed", help="Seed of the split, sampling and augmentation."),
        device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (bf16 autocast on CUDA)."),
        grad_clip: float = typer.Option(1.0, "--grad-clip", min=0.0, help="Gradient norm clip (0 = off)."),
        no_augment: bool = typer.Option(False, "--no-augment", help="Switch off flips/rotations/photometric augmentation."),
        loss_weights: Optional[str] = typer.Option(None, "--loss-weights", help="Loss weights, e.g. focal=20,dice=1,iou=1 (SAM2's, the default); lower focal for models trained from scratch."),
        resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run of --out (or extend it with more --epochs)."),
        scan_lines: str = typer.Option("auto", "--scan-lines", help="Scan-line (row) offset correction of the training and validation images, as segsem extract applies it before the backbone: auto (the default) or off."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ):
        """Fine-tune SAM2 on a few labelled SEM images and write a model for `segsem extract --model`.

        Example:

            segsem finetune train.csv --config sam2.1_hiera_t --checkpoint sam2.1_hiera_tiny.pt --out model.pt --epochs 30

        By default only the image encoder and the prompt encoder train (SegSEM); the mask decoder stays frozen. Each epoch reports the validation IoU and boundary EPE (px); the best epoch is kept.

        After training, the confidence (predicted IoU + stability) is calibrated on the validation images and stored in the model with a confidence threshold.
        """
        from rich.console import Console

        from ..sam.train import finetune as run
        from ..scanlines import SCAN_LINE_MODES
        from .extract import _choice

        console = Console(stderr=True)
        if checkpoint is not None and not checkpoint.is_file():
            raise SegsemError(f"{checkpoint}: checkpoint not found")
        if config is None and checkpoint is None:
            raise SegsemError("--config is required without --checkpoint (e.g. --config sam2.1_hiera_t)")
        weights = None
        if loss_weights:
            weights = {}
            for part in loss_weights.split(","):
                k, _, v = part.partition("=")
                k = k.strip()
                if k not in ("focal", "dice", "iou"):
                    raise SegsemError(f"--loss-weights: unknown term '{k}' (use focal, dice, iou)")
                try:
                    weights[k] = float(v)
                except ValueError:
                    raise SegsemError(f"--loss-weights: '{part}' is not term=number") from None
                if not weights[k] >= 0:
                    raise SegsemError(f"--loss-weights: '{part}' must be >= 0")
        res = run(
            dataset, out, config=config, checkpoint=checkpoint, train=train, val=val, val_fraction=val_fraction,
            epochs=epochs, lr=lr, batch=batch, image_size=image_size, seed=seed, device=device,
            grad_clip=grad_clip if grad_clip > 0 else None, resume=resume, objects_per_image=objects,
            box_margin_px=box_margin_px, do_augment=not no_augment, loss_weights=weights, progress=not quiet,
            console=console, scan_lines=_choice(scan_lines, "--scan-lines", SCAN_LINE_MODES),
        )
        b = res.best
        typer.echo(
            f"wrote {res.model_path} (best epoch {b['epoch']}: val IoU {b['val_iou']:.4f}, "
            f"boundary EPE {b['val_epe_px']:.3f} px; {res.trainable_params:,}/{res.total_params:,} parameters trained); "
            f"log {res.log_path}"
        )
