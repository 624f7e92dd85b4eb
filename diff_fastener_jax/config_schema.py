"""The config schema: every key a run understands, with the paper's values as defaults.

`configs/*.py` start from `base_config()` and change values; `validate_config` refuses keys that are
not in this schema, so a typo in a config file fails before anything compiles.
"""

import ml_collections

DATA_PRESETS = ("mvtec", "visa", "fastener", "demo")


def model_config() -> ml_collections.ConfigDict:
    """Network sizes (DESIGN.md §3)."""
    m = ml_collections.ConfigDict()
    m.in_channels = 3
    m.base_channels = 128
    m.channel_mults = (1, 1, 2, 2, 4, 4)
    m.num_res_blocks = 2
    m.attention_resolutions = (32, 16, 8)  # feature-map sizes (pixels) that get self-attention
    m.num_heads = 4
    m.num_groups = 32  # GroupNorm groups (clamped to the channel count for tiny widths)
    m.activation = "gelu"  # 'gelu' (paper) | 'silu' (reference)
    m.dropout = 0.0
    m.skip_every = 3  # Sparse-Skip: keep every k-th encoder skip; 1 = dense (reference)
    m.use_dacm = True
    m.dacm_use_cbam = True
    m.dacm_use_dilated = True
    m.dacm_reduction = 16
    m.seg_channels = (64, 128, 256, 512, 512, 512)
    # the segmentation net's anomaly probability per pixel at initialisation (its head bias is
    # logit(prior)); 0.5 = a zero bias, as in the paper's code
    m.seg_head_prior = 0.5
    # compute dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU) | 'float32' | 'bfloat16' | 'float16';
    # params are always float32
    m.dtype = "auto"
    # self-attention kernel: 'auto' (cuDNN's fused kernel on GPUs in 16-bit compute, else XLA) | 'xla' | 'cudnn'
    m.attention = "auto"
    # rematerialisation in the train step: 'none' (fastest) | 'blocks' (recompute every res/attention
    # block in the backward pass: ~1/5 more FLOPs, 1.5x the CPU step time, a third of the planned memory)
    m.remat = "none"
    # unified multi-category models (data.category 'a,b' or 'all'): how the segmentation net gets the
    # class ('channels': one-hot input planes | 'film': per-level scale and shift); the reconstruction
    # U-Net always adds a learned class embedding to its time embedding
    m.seg_class_conditioning = "channels"
    return m


def base_config(preset: str = "mvtec") -> ml_collections.ConfigDict:
    """The full schema with the paper's settings; `preset` selects the data layout."""
    if preset not in DATA_PRESETS:
        raise ValueError(f"unknown data preset {preset!r}; choose one of {DATA_PRESETS}")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.format = preset if preset != "fastener" else "folder"
    c.data.root = ""  # dataset root (for 'demo': where to generate; default <workdir>/demo_data)
    # one category, several ('a,b': ONE model conditioned on the class) or 'all' (every category under root)
    c.data.category = "fastener" if preset in ("fastener", "demo") else ""
    c.data.image_size = 256
    c.data.val_fraction = 0.1  # held-out slice of train/good for validation and threshold calibration
    c.data.texture_dir = ""  # optional folder of anomaly source textures (e.g. DTD); never downloaded
    c.data.foreground = "otsu"  # 'otsu' (objects) | 'full' (textures); used when no masks are supplied
    # share of synthetic anomalies that are cut-paste (a Perlin-masked, opaque, shifted copy of the image
    # itself: normal-looking pixels in the wrong place, like a missing or displaced part) instead of a
    # blended texture; 0 = the paper's synthesis only
    c.data.cutpaste_prob = 0.0
    c.data.foreground_dir = "foreground"  # <category>/<this>/<stem>.png: supplied foreground masks, if present
    c.data.num_workers = 2  # grain worker processes (0 = in-process)
    c.data.prefetch = 2  # per-worker buffer (batches)
    # generic folder layout: sub-folder names below root/category
    c.data.normal_dir = "normal"
    c.data.abnormal_dir = "abnormal"
    c.data.mask_dir = "masks"
    c.data.folder_test_fraction = 0.2  # share of the normal images held out as test normals (seeded)
    # demo generator (format 'demo')
    c.data.demo_n_train = 64
    c.data.demo_n_test = 48
    c.data.demo_framing = "fastener"  # 'fastener': one fastener per image (a crop) | 'track': both, small
    # k-fold protocol (crossval.py sets these): fold -1 = no fold split
    c.data.num_folds = 5
    c.data.fold = -1

    c.model = model_config()

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.T = 1000
    c.diffusion.schedule = "linear"  # 'linear' | 'cosine'
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.tau = 300  # training: t_s ~ U{0..tau-1}, t_b ~ U{tau..T-1}
    c.diffusion.eval_t_small = 200
    c.diffusion.eval_t_big = 400
    c.diffusion.guidance_w = 1.0
    # > 0: training draws t_s within this many steps of eval_t_small and t_b of eval_t_big (inside the
    # ranges above) instead of over the whole ranges; 0 = the paper (see train_step.training_timestep_ranges)
    c.diffusion.train_t_window = 0

    c.loss = ml_collections.ConfigDict()
    c.loss.noise_weight = 1.0
    c.loss.focal_weight = 5.0
    c.loss.smoothl1_weight = 1.0
    c.loss.focal_alpha = 0.5
    c.loss.focal_gamma = 4.0
    c.loss.smoothl1_beta = 1.0
    c.loss.detach_recon = False
    c.loss.anomaly_oriented_noise = False  # GLAD eq. 10 target for the synthetic half

    c.optim = ml_collections.ConfigDict()
    c.optim.lr_recon = 1e-4
    c.optim.lr_seg = 1e-4
    c.optim.schedule = "constant"  # 'constant' (paper) | 'warmup_cosine' (needs train.num_steps > 0)
    c.optim.warmup_steps = 0  # linear warm-up steps of 'warmup_cosine'
    c.optim.final_lr_fraction = 0.05  # 'warmup_cosine' ends at this fraction of the peak rate
    # 0 disables EMA (and keeps no EMA copy); the decay warms up as min(decay, (1 + n) / (10 + n))
    c.optim.ema_decay = 0.0
    c.optim.clip = 0.0  # global-norm gradient clipping; 0 disables

    c.infer = ml_collections.ConfigDict()
    c.infer.top_k = 50  # at 256²; scaled with the pixel count at other sizes
    # reconstruction for inference: 'norm_guided' (the paper), 'one_step' (x0 from t_big in one step),
    # 'ddim' (iterative, infer.ddim_steps steps from t_big) or 'ddpm' (ancestral, every step from t_big):
    # the ablation rows of the paper's Table 3; or 'adaptive' (GLAD's per-image denoising step, seed 003
    # §3.3-3.4): DDIM from adaptive_t_max over ddim_steps grid times, stop where the denoised sample's
    # noise-free estimate departs from the input's by more than adaptive_delta (top-K mean of the
    # |difference| / 2 map), restart adaptive_margin grid steps earlier, fuse with
    # sigmoid(adaptive_fusion_gain * (difference / adaptive_delta - 1)).
    c.infer.method = "norm_guided"
    c.infer.ddim_steps = 10
    c.infer.adaptive_t_max = 900
    c.infer.adaptive_delta = 0.1
    c.infer.adaptive_margin = 1
    c.infer.adaptive_fusion_gain = 5.0
    c.infer.map = "segmentation"  # 'segmentation' | 'recon_error' (seed 002 baseline)
    # Gaussian smoothing of the anomaly map before scoring, sigma in pixels at 256² (scaled with the
    # image side); 0 = the paper's raw map. Smoothing trades the sharpness of the map's edges for fewer
    # isolated false-positive pixels (PatchCore smooths with sigma 4 at 224²).
    c.infer.map_sigma = 0.0
    c.infer.batch_size = 16
    c.infer.seed = 0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 4  # GLOBAL; even and divisible by 2 x devices (half normal, half synthetic)
    # rows per device per forward/backward pass: 0 = the device's whole share at once; an even divisor
    # of it accumulates gradients over microbatches (lax.scan) in the same step: the same update, a
    # fraction of the activation memory (fits the paper's batch where it does not fit whole)
    c.train.microbatch = 0
    c.train.num_steps = -1  # -1: derive from num_epochs
    c.train.num_epochs = 1500
    c.train.checkpoint_every = 2000
    c.train.keep_checkpoints = 3
    c.train.log_every = 50
    c.train.eval_every = 5000
    c.train.val_batches = 4
    # which checkpoint the run keeps (calibrated, evaluated, exported): 'last', or the best validation
    # step by 'val_recon_error' (lowest) | 'val_image_auroc' | 'val_pixel_auroc' | 'val_pixel_aupro'
    # (highest); validation = held-out normals + synthetic anomalies, never the test set
    c.train.select_on = "last"
    c.train.tensorboard = False

    c.eval = ml_collections.ConfigDict()
    c.eval.fpr_target = 0.01  # label threshold: this FPR on held-out normal validation images
    c.eval.threshold = -1.0  # >= 0: use this image-score threshold instead
    c.eval.aupro_limit = 0.3
    c.eval.num_panels = 6
    c.eval.pixel_bins = 10000  # ignored: pixel metrics are exact since issue 11; kept so older runs load

    return c
