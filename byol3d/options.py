"""Every config key: its default, accepted types, allowed choices and one-line meaning.

:data:`OPTIONS` is the one declaration of the config: :mod:`byol3d.config` builds the defaults
from it and rejects any key it does not hold; the README's configuration reference is
printed from it (``scripts/config_reference.py``). Ranges are checked in
:func:`byol3d.config.validate_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from byol3d.models.encoders import ENCODERS, NORMS

__all__ = ["OPTIONS", "Option", "SECTIONS"]


@dataclass(frozen=True)
class Option:
    """One config key: its default, the accepted types, and a one-line meaning."""

    default: Any
    types: tuple[type, ...]
    help: str
    choices: tuple[Any, ...] | None = None


_num = (int, float)
_prob = (int, float, list)  # a probability for both views, or [view1, view2]

OPTIONS: dict[str, Option] = {
    "seed": Option(0, (int,), "random seed of weights, data order and augmentations"),
    "output_dir": Option(
        "runs/byol3d", (str,), "run directory: config.yaml, checkpoints/, metrics.csv, encoder.pt"
    ),
    # data
    "data.root": Option(
        None,
        (str, type(None)),
        "folder searched recursively: 3D .nii/.nii.gz/.nrrd/.mha/.mhd and DICOM series; 2D .png/.jpg/.jpeg/.bmp/.tif/.tiff",
    ),
    "data.csv": Option(
        None,
        (str, type(None)),
        "2D and 3D: CSV list of images instead of a folder search (column path or id, optional label; relative to data.root)",
    ),
    "data.spatial_dims": Option(3, (int,), "3 for volumes, 2 for frames", (2, 3)),
    "data.in_channels": Option(
        1, (int,), "image channels: 1 for CT, 3 for RGB frames (2D: 1 or 3)"
    ),
    "data.channels": Option(
        None,
        (list, type(None)),
        "3D: several co-registered images per subject as channels, e.g. [t1, t2, flair]: CSV column names, or names matched in each subject folder under data.root; sets data.in_channels",
    ),
    "data.channel_patterns": Option(
        None,
        (list, type(None)),
        "3D: one file-name pattern (glob, case-insensitive) per channel inside each subject folder (null: '*NAME.*' per name of data.channels)",
    ),
    "data.resample_channels": Option(
        False,
        (bool,),
        "3D: resample channels on another grid onto the first channel's (linear) instead of refusing the subject",
    ),
    "data.dicom": Option(True, (bool,), "3D: also look for DICOM series folders under data.root"),
    "data.dicom_series": Option(
        None,
        (str, type(None)),
        "3D: the series read from a DICOM folder holding several: a SeriesInstanceUID or part of a SeriesDescription (null: the one with the most files)",
    ),
    "data.min_frame_std": Option(
        None,
        (int, float, type(None)),
        "2D: before training, drop frames whose pixel std (0..1 units) is below this: constant, black or near-black frames (e.g. 0.02; null: keep all), listed in OUTPUT_DIR/dropped_frames.txt",
    ),
    "data.val_fraction": Option(
        0.1, _num, "fraction of files held out for the validation loss (0 for none)"
    ),
    "data.cache": Option(
        "cache",
        (str,),
        "none: load every epoch; cache: preprocessed volumes in RAM; persistent: on disk; store: the preprocess-once store (float16/uint8 .npy, memory-mapped, each crop read from the map; written on first use or by byol3d preprocess)",
        ("none", "cache", "persistent", "store"),
    ),
    "data.cache_dir": Option(
        None,
        (str, type(None)),
        "folder of the persistent cache or the store (default OUTPUT_DIR/cache, OUTPUT_DIR/store); one store serves every run with the same preprocessing",
    ),
    "data.cache_rate": Option(1.0, _num, "fraction of volumes kept in the RAM cache"),
    "data.on_bad_file": Option(
        "error",
        (str,),
        "an unusable image: error stops with its name; skip checks every file first, lists bad ones in OUTPUT_DIR/skipped_files.txt and goes on",
        ("error", "skip"),
    ),
    "data.num_workers": Option(2, (int,), "DataLoader worker processes"),
    "data.gpu_views": Option(
        False,
        (bool,),
        "draw the random views on the GPU in ThreadDataLoader threads (one CUDA device; pairs with cache: cache)",
    ),
    # model
    "model.encoder": Option(
        "resnet50",
        (str,),
        "the encoder of the network you fine-tune: a MONAI ResNet depth (FlexibleUNet), nnunet (nnU-Net plans), swin_unetr (SwinUNETR's swinViT) or segresnet (SegResNet's encoder)",
        ENCODERS,
    ),
    "model.norm": Option(
        "batch",
        (str,),
        "ResNet normalisation; only batch loads strictly into FlexibleUNet (other encoders keep their own: leave batch)",
        NORMS,
    ),
    "model.swin_feature_size": Option(
        48,
        (int,),
        "swin_unetr: SwinUNETR's feature_size (a multiple of 12; MONAI's SSL recipe: 48)",
    ),
    "model.swin_depths": Option(
        [2, 2, 2, 2], (list,), "swin_unetr: SwinUNETR's depths, Swin blocks in each of the 4 stages"
    ),
    "model.segresnet_init_filters": Option(
        8, (int,), "segresnet: SegResNet's init_filters (a multiple of 8)"
    ),
    "model.segresnet_blocks_down": Option(
        [1, 2, 2, 4], (list,), "segresnet: SegResNet's blocks_down, residual blocks per level"
    ),
    "model.nnunet_plans": Option(
        None,
        (str, type(None)),
        "nnunet: nnU-Net plans JSON (e.g. nnUNetResEncUNetLPlans.json); its patch size, spacing and normalisation become the defaults of roi_size, pixdim, hu_window (CT) or intensity zscore (MR)",
    ),
    "model.nnunet_configuration": Option(
        "3d_fullres", (str,), "nnunet: the plans' configuration (a 3D one)"
    ),
    "model.hidden_layer": Option(
        "avgpool",
        (str,),
        "encoder layer whose output is the representation (spatial layers are averaged; avgpool: the deepest stage of non-ResNets)",
    ),
    "model.projection_dim": Option(256, (int,), "projector/predictor output size (paper: 256)"),
    "model.hidden_dim": Option(4096, (int,), "projector/predictor hidden size (paper: 4096)"),
    "model.dense_weight": Option(
        0.0, _num, "weight of the dense (local) BYOL term on the views' overlap; 0 = off"
    ),
    "model.dense_layer": Option(
        "layer3",
        (str,),
        "encoder stage the dense term compares: layer1..layer4 are the stages at strides 4, 8, 16, 32 of any encoder (layer2 for crops under ~96 voxels), or a stage's module name",
    ),
    "model.dense_grid": Option(4, (int,), "dense term: points per axis sampled in each overlap"),
    "model.separate_views": Option(
        False,
        (bool,),
        "forward each view alone (batch norm over one view, as the paper) instead of both in one batch",
    ),
    # transforms
    "transforms.roi_size": Option(
        [128, 128, 128],
        (list,),
        "crop size of each view, one entry per spatial dim, each >= 32 (swin_unetr: multiples of 32; nnunet: the plans' patch size by default)",
    ),
    "transforms.pixdim": Option(
        None, (list, type(None)), "3D: resample to this voxel spacing in mm (null: keep the file's)"
    ),
    "transforms.intensity": Option(
        "ct_window",
        (str,),
        "3D: intensity rule per volume: ct_window maps hu_window to [0, 1] (CT); percentile clips to the foreground percentiles, then [0, 1]; zscore subtracts the foreground mean and divides by its std (MR, as nnU-Net)",
        ("ct_window", "percentile", "zscore"),
    ),
    "transforms.hu_window": Option(
        [-1000.0, 1000.0],
        (list,),
        "3D: HU range mapped to [0, 1], values outside clipped (ct_window)",
    ),
    "transforms.percentiles": Option(
        [0.5, 99.5], (list,), "3D: foreground percentiles [low, high] the percentile rule clips to"
    ),
    "transforms.foreground": Option(
        "auto",
        (str,),
        "3D: foreground voxels (statistics, crop, empty check): hu = above foreground_hu; otsu = above Otsu's threshold; nonzero = not 0 (skull-stripped MR); auto = hu for ct_window, else otsu",
        ("auto", "hu", "otsu", "nonzero"),
    ),
    "transforms.crop_foreground": Option(
        True, (bool,), "3D: crop to the bounding box of the foreground"
    ),
    "transforms.foreground_hu": Option(
        -500.0, _num, "3D: HU threshold of the body (foreground hu, the default for CT)"
    ),
    "transforms.scale": Option(
        [0.2, 1.0],
        (list,),
        "random resized crop: range of the crop's volume (2D: area) fraction (BYOL 2D: [0.08, 1.0])",
    ),
    "transforms.ratio": Option(
        [0.75, 1.3333333], (list,), "random resized crop: range of per-axis aspect ratios"
    ),
    "transforms.flip_prob": Option(
        0.5, _prob, "flip probability per axis (2D: horizontal flip only)"
    ),
    "transforms.rotate90_prob": Option(
        0.5, _prob, "3D: probability of a random 90-degree rotation in the axial plane"
    ),
    "transforms.intensity_prob": Option(
        0.8, _prob, "3D: probability of the intensity scale and shift"
    ),
    "transforms.intensity_scale": Option(0.1, _num, "3D: intensity scale factor range +-"),
    "transforms.intensity_shift": Option(
        0.1, _num, "3D: intensity shift range +- (in [0, 1] window units)"
    ),
    "transforms.gamma_prob": Option(0.5, _prob, "3D: probability of a gamma contrast change"),
    "transforms.gamma": Option([0.7, 1.5], (list,), "3D: gamma range"),
    "transforms.noise_prob": Option(0.2, _prob, "3D: probability of Gaussian noise"),
    "transforms.noise_std": Option(0.03, _num, "3D: Gaussian noise std (window units)"),
    "transforms.blur_prob": Option(
        [1.0, 0.1], _prob, "Gaussian smoothing probability per view (BYOL: 1.0 and 0.1)"
    ),
    "transforms.blur_sigma": Option(
        [0.5, 1.5], (list,), "Gaussian smoothing sigma range in voxels (BYOL 2D: [0.1, 2.0])"
    ),
    "transforms.views": Option(
        "cpu",
        (str,),
        "where the random views are made. cpu: per sample in the DataLoader workers (MONAI transforms; 2D with the kornia colour ops); batched: the workers only draw each view's box and parameters and slice the box, the views of a whole batch are made at once (transforms.device; 2D: crop-resize-flip, then the colour ops and the normalisation batched); same keys, same distributions",
        ("cpu", "batched"),
    ),
    "transforms.device": Option(
        "auto",
        (str,),
        "with views: batched: auto makes them on train.device (a GPU: one batch ahead on a side stream; a CPU: in the DataLoader workers), cpu always in the workers",
        ("auto", "cpu"),
    ),
    "transforms.frame_size": Option(
        None,
        (int, type(None)),
        "2D: shrink frames whose shorter side is longer than this before caching (null: keep)",
    ),
    "transforms.colour_jitter_prob": Option(
        0.8, _prob, "2D: probability of colour jitter (brightness, contrast, saturation, hue)"
    ),
    "transforms.brightness": Option(0.4, _num, "2D: brightness factor range 1 +-"),
    "transforms.contrast": Option(0.4, _num, "2D: contrast factor range 1 +-"),
    "transforms.saturation": Option(0.2, _num, "2D: saturation factor range 1 +-"),
    "transforms.hue": Option(
        0.1, _num, "2D: hue shift range +- (fraction of the colour circle, <= 0.5)"
    ),
    "transforms.grayscale_prob": Option(0.2, _prob, "2D: probability of converting to grey"),
    "transforms.solarize_prob": Option(
        [0.0, 0.2], _prob, "2D: probability of solarising at 0.5 per view (BYOL: 0.0 and 0.2)"
    ),
    "transforms.mean": Option(
        None,
        (list, type(None)),
        "2D: per-channel mean of the [0, 1] frames for normalisation (null: 0.5); byol3d stats measures it",
    ),
    "transforms.std": Option(
        None,
        (list, type(None)),
        "2D: per-channel std of the [0, 1] frames for normalisation (null: 0.5); byol3d stats measures it",
    ),
    # train
    "train.max_epochs": Option(
        100, (int,), "epochs; raising it and re-running resumes the same run"
    ),
    "train.batch_size": Option(4, (int,), "volumes per step per process (each gives two views)"),
    "train.optimizer": Option(
        "adamw",
        (str,),
        "adamw, sgd or lars (biases and norm weights get no decay/adaptation)",
        ("adamw", "sgd", "lars"),
    ),
    "train.lr": Option(
        3.0e-4, _num, "peak learning rate after warm-up (AdamW ~3e-4; LARS 0.2 x batch/256)"
    ),
    "train.min_lr": Option(0.0, _num, "learning rate at the end of the cosine decay"),
    "train.weight_decay": Option(1.0e-4, _num, "weight decay (paper with LARS: 1.5e-6)"),
    "train.momentum": Option(0.9, _num, "SGD/LARS momentum"),
    "train.warmup_epochs": Option(10.0, _num, "linear learning-rate warm-up length in epochs"),
    "train.base_tau": Option(
        0.996, _num, "initial target decay rate, cosine to 1.0 (0.99 for short runs)"
    ),
    "train.accumulate_steps": Option(
        1, (int,), "gradient accumulation: iterations per optimizer step"
    ),
    "train.amp": Option(
        "auto",
        (str,),
        "autocast: auto (bf16 on GPUs that support it, else fp16; off on CPU), bf16, fp16, none",
        ("auto", "bf16", "fp16", "none"),
    ),
    "train.channels_last": Option(
        "auto",
        (str,),
        "channels-last (3D) memory format for weights and batches: auto (on for CUDA only; slower on CPU), on, off",
        ("auto", "on", "off"),
    ),
    "train.compile": Option(
        False,
        (bool,),
        "torch.compile the encoders' hook-free forward (one graph with hidden_layer avgpool; first steps slower while compiling)",
    ),
    "train.activation_checkpointing": Option(
        False,
        (bool,),
        "recompute the encoder's activations in the backward pass: less memory for large crops, ~1/3 more compute",
    ),
    "train.device": Option("auto", (str,), "auto (cuda if available), cpu, cuda, cuda:N"),
    "train.sync_bn": Option(
        True, (bool,), "under DDP: batch-norm statistics over the global batch (SyncBatchNorm)"
    ),
    "train.grad_clip": Option(
        None, (int, float, type(None)), "clip the gradient norm to this value (null: off)"
    ),
    "train.log_every": Option(
        10, (int,), "iterations between metric flushes (the only host syncs)"
    ),
    "train.checkpoint_every": Option(1, (int,), "epochs between checkpoints"),
    "train.keep_checkpoints": Option(
        3,
        (int,),
        "newest checkpoints kept in checkpoints/ (older ones removed once a newer one is written)",
    ),
    "train.tensorboard_views_every": Option(
        500, (int,), "iterations between view previews in TensorBoard (0: never)"
    ),
    "train.progress": Option(True, (bool,), "show a tqdm progress bar"),
    "train.knn_csv": Option(
        None,
        (str, type(None)),
        "labels CSV (path or id, label) for an online kNN accuracy in epochs.csv (null: off)",
    ),
    "train.knn_every": Option(1, (int,), "epochs between online kNN evaluations"),
    "train.tensorboard": Option(
        True, (bool,), "write TensorBoard scalars when tensorboard is installed"
    ),
}

SECTIONS = ("data", "model", "transforms", "train")
