"""The config schema: every key a run understands, with the paper's values as defaults.

`configs/*.py` start from `base_config()` and change values; `validate_config` refuses keys that are
not in this schema, so a typo in a config file fails before anything compiles.

The allowed values of every enumerated key are the tuples below, defined once beside the defaults;
`config.validate_config` and the code that implements the choices import them from here. The first
entry of each is the paper's choice where it has one.
"""

import ml_collections

DATA_PRESETS = ("mvtec", "visa", "fastener", "demo")
DATA_FORMATS = ("mvtec", "visa", "folder", "demo")
# 'auto': decided from the training normals when training starts (data/foreground_kind.py)
FOREGROUNDS = ("otsu", "full", "auto")
DEMO_FRAMINGS = ("fastener", "track")  # one fastener per image (a crop) | the whole sleeper crossing
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # 'auto': bfloat16 on GPUs/TPUs, float32 on CPUs
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_MODES = ("none", "blocks")
SEG_CLASS_CONDITIONINGS = ("channels", "film")
SCHEDULES = ("linear", "cosine")
LR_SCHEDULES = ("constant", "warmup_cosine")
# learning-rate schedules whose rate at a step depends on train.num_steps (the decay horizon)
STEP_DEPENDENT_LR_SCHEDULES = ("warmup_cosine",)
INFER_METHODS = ("norm_guided", "one_step", "ddim", "ddpm", "adaptive")
ANOMALY_MAPS = ("segmentation", "recon_error", "segmentation+recon_error")
# infer.score_region, infer.map_region: where the image score's top-K pixels are taken, and where the
# returned map may mark anything: the whole image, or the object's Otsu foreground (the rule that places
# the synthetic anomalies; diff_fastener_jax/foreground.py)
REGIONS = ("image", "foreground")
# infer.normal_map: 'off' | 'subtract' (score the map minus the held-out normals' mean map) |
# 'standardise' (that difference divided by the normals' spread there) | 'auto' (ONE_POSE_NORMAL_MAP
# where the training normals show one object in one pose, else 'off'; data/foreground_kind.py)
FITTED_NORMAL_MAPS = ("subtract", "standardise")
NORMAL_MAPS = ("off", *FITTED_NORMAL_MAPS, "auto")
ONE_POSE_NORMAL_MAP = "standardise"
# The settings whose AUTO training decides once, from the training normals (data/foreground_kind.py),
# and the choices a trained run's config.json holds instead
AUTO = "auto"
DECIDED_AT_TRAINING = {
    key: tuple(v for v in allowed if v != AUTO)
    for key, allowed in (("data.foreground", FOREGROUNDS), ("infer.normal_map", NORMAL_MAPS))
}
# infer.tiling, for models trained on data.patch_size crops: 'tiles' (overlapping patch-size tiles,
# stitched) | 'whole' (the network applied to the whole image at once, fully convolutionally)
TILINGS = ("tiles", "whole")
TILE_STRIDE_HALF_PATCH = 0  # infer.tile_stride 0: half the patch size
# eval.reference: the reference detectors fitted on the training normals and reported beside the model
REFERENCE_DETECTORS = ("all", "global_stats", "pixel_gaussian", "none")
# train.select_on: validation metric -> 'min' (lower is better) or 'max'; 'last' keeps the final step
SELECT_METRICS = {
    "val_recon_error": "min",
    "val_image_auroc": "max",
    "val_pixel_auroc": "max",
    "val_pixel_aupro": "max",
    # on data.val_anomalies (real defective images) against the held-out normals
    "val_real_image_auroc": "max",
    "val_real_pixel_auroc": "max",
}
# the SELECT_METRICS that need data.val_anomalies
REAL_VAL_METRICS = ("val_real_image_auroc", "val_real_pixel_auroc")
SELECT_ON = ("last", *SELECT_METRICS)

# train.num_steps: this value (the default) derives the step count from train.num_epochs
NUM_STEPS_FROM_EPOCHS = -1
# data.fold: this value (the default) trains on every fold (no k-fold split)
NO_FOLD = -1
# eval.threshold: below 0 the image-score threshold is calibrated on validation normals (eval.fpr_target)
CALIBRATE_THRESHOLD = -1.0
# infer.score_sigma, infer.score_chroma_weight: the image score reads the returned map's own setting
# (infer.map_sigma, infer.chroma_weight)
SCORE_AS_MAP = -1.0
# Keys added after runs were saved, with the value that does what those runs did: a run's config digest
# (detector.json) leaves them out at that value, so its stored threshold and normal map stay valid.
ADDED_KEY_DEFAULTS = {
    "infer.score_sigma": SCORE_AS_MAP,
    "infer.chroma_weight": 0.0,
    "infer.score_chroma_weight": SCORE_AS_MAP,
    "infer.map_region": "image",
}

# data.resize (RESIZE_MODES): 'square' = both sides become data.image_size (the paper; non-square images
# are squashed) | 'short_side' = the short side becomes data.image_size, the long side keeps the aspect
# ratio | 'long_side' = the long side becomes data.image_size; the scaled side is rounded to a multiple
# of the networks' total stride
RESIZE_MODES = ("square", "short_side", "long_side")
PATCH_OFF = 0  # data.patch_size: train on whole images (the paper)
INT_OR_PAIR_KEYS = ("data.image_size",)  # keys that take an int or an (H, W) pair
# data.synthesis: 'family:share,...' over these families (shares are relative weights); '' = the
# paper's Perlin blend, with data.cutpaste_prob of the draws cut-paste instead
SYNTHESIS_FAMILIES = ("perlin", "cutpaste", "crack", "pore", "intensity", "blur")
SYNTHESIS_FROM_CUTPASTE_PROB = ""


def parse_synthesis(text: str) -> tuple[tuple[str, float], ...]:
    """data.synthesis 'perlin:0.5,crack:0.3,pore' -> (('perlin', 0.5), ('crack', 0.3), ('pore', 1.0)):
    the families in the order given with their shares normalised to sum 1 (a family without ':share'
    weighs 1); () for ''. Raises ValueError naming the bad part."""
    parts = [p.strip() for p in str(text or "").split(",") if p.strip()]
    weights: dict[str, float] = {}
    for part in parts:
        name, _, share = part.partition(":")
        name = name.strip()
        if name not in SYNTHESIS_FAMILIES:
            raise ValueError(f"unknown synthesis family {name!r} (families: {', '.join(SYNTHESIS_FAMILIES)})")
        if name in weights:
            raise ValueError(f"names the family {name!r} twice")
        try:
            weight = float(share) if share.strip() else 1.0
        except ValueError:
            raise ValueError(f"share {share!r} of {name!r} is not a number") from None
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"share of {name!r} must be a positive number, got {share!r}")
        weights[name] = weight
    total = sum(weights.values())
    return tuple((name, w / total) for name, w in weights.items())


# Values the hint of an ill-typed override shows for the keys whose default is a sentinel (the other
# keys show their default)
HINT_EXAMPLES = {"train.num_steps": 100, "data.fold": 0, "eval.threshold": 0.5}

# Resuming a run (its workdir holds checkpoints): the keys, and every key of the sections ending in
# '.', whose change alters what the restored state is trained on; a change is refused unless
# train.allow_resume_changes. train.num_steps joins them under a STEP_DEPENDENT_LR_SCHEDULES schedule.
RESUME_FIXED = (
    "seed",
    "model.",
    "diffusion.",
    "loss.",
    "optim.",
    "train.batch_size",
    "data.format",
    "data.category",
    "data.image_size",
    "data.resize",
    "data.patch_size",
    "data.cutpaste_prob",
    "data.synthesis",
)
# ... except these, which change how the same function is computed, not what is trained
RESUME_FREE = ("model.attention", "model.remat")

# Keys that nothing reads and the schema leaves out: a saved config.json that holds them loads, and
# they are dropped without an error (`config.migrate_saved`).
DROPPED_KEYS = ("eval.pixel_bins",)
# Keys that a saved config.json may hold under an earlier name: old key -> (key, {old value: value}).
# `config.migrate_saved` reads them as the new key; on the command line the old key names the new one.
RENAMED_KEYS = {"infer.subtract_normal_map": ("infer.normal_map", {True: "subtract", False: "off"})}


def model_config() -> ml_collections.ConfigDict:
    """Network sizes (Diff-Fastener's reconstruction U-Net on DiffusionAD's, and its segmentation U-Net)."""
    m = ml_collections.ConfigDict()
    m.in_channels = 3
    m.base_channels = 128
    m.channel_mults = (1, 1, 2, 2, 4, 4)
    m.num_res_blocks = 2
    m.attention_resolutions = (32, 16, 8)  # feature-map sizes (pixels) that get self-attention
    m.num_heads = 4
    m.num_groups = 32  # GroupNorm groups (clamped to the channel count for tiny widths)
    m.activation = "gelu"  # ACTIVATIONS: 'gelu' (paper) | 'gelu_tanh' (faster on CPUs) | 'silu' (reference) | 'relu'
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
    # compute dtype (DTYPES): 'auto' (bfloat16 on GPU/TPU, float32 on CPU) | 'float32' | 'bfloat16' | 'float16';
    # params are always float32
    m.dtype = "auto"
    # self-attention kernel (ATTENTION_IMPLS): 'auto' (cuDNN's fused kernel on GPUs in 16-bit compute, else XLA) | 'xla' | 'cudnn'
    m.attention = "auto"
    # rematerialisation in the train step (REMAT_MODES): 'none' (fastest) | 'blocks' (recompute every res/attention
    # block in the backward pass: ~1/5 more FLOPs, 1.5x the CPU step time, a third of the planned memory)
    m.remat = "none"
    # unified multi-category models (data.category 'a,b' or 'all'): how the segmentation net gets the
    # class (SEG_CLASS_CONDITIONINGS; 'channels': one-hot input planes | 'film': per-level scale and shift); the reconstruction
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
    c.data.image_size = 256  # int, or (H, W) with data.resize='square'
    c.data.resize = "square"  # RESIZE_MODES (see there); every reader and image load use the same rule
    # > 0: train on random P x P crops of the resized images (synthesis inside the crop): a step costs a
    # P x P step whatever the image size; PATCH_OFF (0) = whole images (the paper)
    c.data.patch_size = PATCH_OFF
    c.data.val_fraction = 0.1  # held-out slice of train/good for validation and threshold calibration
    c.data.texture_dir = ""  # optional folder of anomaly source textures (e.g. DTD); never downloaded
    # FOREGROUNDS: 'otsu' (objects) | 'full' (textures) | 'auto' (which of the two the training normals
    # show, decided once and saved in config.json); used when no masks are supplied
    c.data.foreground = "otsu"
    # share of synthetic anomalies that are cut-paste (a Perlin-masked, opaque, shifted copy of the image
    # itself: normal-looking pixels in the wrong place, like a missing or displaced part) instead of a
    # blended texture; 0 = the paper's synthesis only
    c.data.cutpaste_prob = 0.0
    # SYNTHESIS_FAMILIES with shares, e.g. 'perlin:0.5,cutpaste:0.2,crack:0.15,pore:0.1,intensity:0.05':
    # 'perlin' = the paper's Perlin-masked texture blend, 'cutpaste' = see data.cutpaste_prob, 'crack' =
    # thin dark or bright random-walk cracks and scratches 1-3 px wide, 'pore' = small dark or bright
    # spots, 'intensity' = low-contrast brightness patches, 'blur' = blurred patches; all drawn inside
    # the foreground and labelled where the pixels visibly change. SYNTHESIS_FROM_CUTPASTE_PROB ('') =
    # 'perlin' with data.cutpaste_prob of the draws cut-paste (the paper's synthesis at 0)
    c.data.synthesis = SYNTHESIS_FROM_CUTPASTE_PROB
    # optional folder of a few REAL defective images (directly or in <type>/ sub-folders; masks, if any,
    # in its <data.mask_dir>/[<type>/]<stem>*.png as in the folder layout): used only for validation
    # and checkpoint selection (val_real_image_auroc), never for training or threshold calibration
    c.data.val_anomalies = ""
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
    c.data.demo_framing = (
        "fastener"  # DEMO_FRAMINGS: 'fastener': one fastener per image (a crop) | 'track': both, small
    )
    # k-fold protocol (crossval.py sets these): fold NO_FOLD (-1) = no fold split, else in [0, num_folds)
    c.data.num_folds = 5
    c.data.fold = NO_FOLD

    c.model = model_config()

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.T = 1000
    c.diffusion.schedule = "linear"  # SCHEDULES: 'linear' | 'cosine'
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
    # LR_SCHEDULES: 'constant' (paper) | 'warmup_cosine' (needs train.num_steps > 0: the decay horizon)
    c.optim.schedule = "constant"
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
    # ANOMALY_MAPS: 'segmentation' (the paper) | 'recon_error' (seed 002 baseline) | 'segmentation+recon_error'
    # (their mean: the reconstruction error adds weight to large texture changes, e.g. rust over a plate,
    # that the segmentation net marks only faintly; docs/experiments.md measures where it helps and hurts)
    c.infer.map = "segmentation"
    # The reconstruction error's extra weight on colour: the error at a pixel is the channels' mean of
    # |x - recon| plus chroma_weight times the length of the part of x - recon orthogonal to grey (the
    # part that changes hue, not brightness), / 2 and clipped to [0, 1]. A highlight, a shadow or an
    # exposure change moves all channels alike and adds nothing; a change of material (rust, a stain)
    # shifts the hue and adds. 0 = the plain error; no effect on grey images.
    c.infer.chroma_weight = 0.0
    # The chroma weight of the map the image score's top-K is read from, when it differs from the
    # returned map's (SCORE_AS_MAP: the same map). On MPDD the weighted error ranks rusted plates above
    # lit ones while the plain error's map covers the defects' regions better (AUPRO), so a recipe may
    # weight the score alone and return the plain error's map.
    c.infer.score_chroma_weight = SCORE_AS_MAP
    # Gaussian smoothing of the anomaly map before scoring, sigma in pixels at 256² (scaled with the
    # square root of the map's area, the same in both directions); 0 = the paper's raw map. Smoothing trades the sharpness of the map's edges for fewer
    # isolated false-positive pixels (PatchCore smooths with sigma 4 at 224²).
    c.infer.map_sigma = 0.0
    # The smoothing of the map the image score's top-K is read from, sigma in pixels at 256², when it
    # differs from the returned map's (SCORE_AS_MAP: the same map). A wide sigma gives the best
    # pixel map (it fills in a large defect that the map marks unevenly) but dilutes a small defect's
    # peak in the score, so a recipe may smooth the map wider than the score (as PatchCore scores its
    # raw patch distances and smooths only the map it shows).
    c.infer.score_sigma = SCORE_AS_MAP
    # NORMAL_MAPS. 'subtract': the image score is the top-K mean of the map minus the normal map, the mean
    # map of the held-out normal images (blurred; fitted with the threshold, stored as normal_map.npy). On
    # an object seen in one pose (a bottle from above) the networks answer its fixed structure with the
    # same faint response in every image; subtracting it lets a faint real defect outscore it. Where the
    # pose or background varies (MPDD plates) there is no shared response to remove and the score gets
    # worse (docs/experiments.md). 'standardise' divides that difference by the normals' per-pixel
    # spread (plus its median over the image), so a response where the normals themselves vary (a
    # glass rim's highlight) counts less than the same response where they agree. Needs >= 2 held-out
    # normals (3 to standardise; data.val_fraction) and a one-category model. 'auto' decides when
    # training starts, from how much the training normals' objects overlap.
    c.infer.normal_map = "off"
    # REGIONS: 'image' | 'foreground' = the top-K of the image's data.foreground region only: the Otsu
    # object ('otsu'), everywhere ('full'); the map stays whole (infer.map_region). Training draws its
    # anomalies there, so the segmentation net's answer on the background (a shadow in a corner, a cable)
    # is no evidence of a defect. For objects on a background, or with data.foreground='auto'; not with
    # 'otsu' on surfaces and textures, whose Otsu class is half the surface (docs/experiments.md)
    c.infer.score_region = "image"
    # REGIONS: 'image' | 'foreground' = the returned map is zero outside the image's data.foreground region
    # (the Otsu object with 'otsu'; everywhere with 'full') before it is smoothed; the image score is
    # unchanged. The segmentation net never saw an anomaly drawn outside that region, so what it marks
    # there (a shadow, the background's texture) is no evidence, and in pixel metrics every such pixel
    # counts as a false positive against every defect.
    c.infer.map_region = "image"
    c.infer.batch_size = 16
    c.infer.seed = 0
    # data.patch_size > 0: how the patch-trained network covers a whole image at data.image_size (TILINGS):
    # 'tiles' = overlapping patch-size tiles every infer.tile_stride px (TILE_STRIDE_HALF_PATCH = half a
    # patch), Hann-weighted and stitched into one full-size map | 'whole' = one fully convolutional pass
    c.infer.tiling = "tiles"
    c.infer.tile_stride = TILE_STRIDE_HALF_PATCH

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 4  # GLOBAL; even and divisible by 2 x devices (half normal, half synthetic)
    # rows per device per forward/backward pass: 0 = the device's whole share at once; an even divisor
    # of it accumulates gradients over microbatches (lax.scan) in the same step: the same update, a
    # fraction of the activation memory (fits the paper's batch where it does not fit whole)
    c.train.microbatch = 0
    # > 0: the number of steps; NUM_STEPS_FROM_EPOCHS (-1, the only other value allowed): derive it
    # from train.num_epochs passes over the normal training images
    c.train.num_steps = NUM_STEPS_FROM_EPOCHS
    c.train.num_epochs = 1500
    c.train.checkpoint_every = 2000
    c.train.keep_checkpoints = 3
    c.train.log_every = 50
    c.train.eval_every = 5000
    c.train.val_batches = 4
    # which checkpoint the run keeps (calibrated, evaluated, exported): 'last', or the best validation
    # step by 'val_recon_error' (lowest) | 'val_image_auroc' | 'val_pixel_auroc' | 'val_pixel_aupro'
    # (highest); validation = held-out normals + synthetic anomalies, never the test set; with
    # data.val_anomalies also 'val_real_image_auroc' | 'val_real_pixel_auroc' (held-out normals + those
    # real defective images)
    c.train.select_on = "last"
    c.train.tensorboard = False
    # Resuming a run (its workdir holds checkpoints) with settings that change what is trained (model,
    # diffusion, loss, optimiser, batch size, seed, the step count under a step-dependent learning-rate
    # schedule) is refused, naming what changed; True resumes anyway: the restored step continues under
    # the new settings (a schedule is the new one read at the restored step, so the rate can jump).
    c.train.allow_resume_changes = False

    c.eval = ml_collections.ConfigDict()
    c.eval.fpr_target = 0.01  # label threshold: this FPR on held-out normal validation images
    c.eval.threshold = CALIBRATE_THRESHOLD  # >= 0: use this image-score threshold instead
    c.eval.aupro_limit = 0.3
    c.eval.num_panels = 6
    # REFERENCE_DETECTORS: baselines fitted on the training normals only and scored on the same test
    # split ('global_stats': the best of four grey-level image statistics; 'pixel_gaussian': a per-pixel
    # Gaussian of the normals, z-score map, top-K score)
    c.eval.reference = "all"

    return c


def use_cpu_model(c: ml_collections.ConfigDict) -> None:
    """The CPU recipes' small networks (demo and real data): base width 32, four levels of one res block,
    one skip per level, a segmentation net of 16-64 channels. Attention placement is each recipe's own."""
    m = c.model
    m.base_channels = 32
    m.channel_mults = (1, 2, 2, 2)
    m.num_res_blocks = 1
    m.num_heads = 4
    m.num_groups = 8
    m.dacm_reduction = 8
    m.skip_every = 2  # = num_res_blocks + 1: one skip per level
    m.seg_channels = (16, 32, 64, 64)


def use_short_run_optimiser(c: ml_collections.ConfigDict) -> None:
    """The CPU recipes' optimiser for runs of hundreds of steps: a peak rate 3x the paper's constant
    3e-4, 40 warm-up steps and a cosine decay to 5% so the last steps settle, an EMA of the weights
    (evaluated and validated), gradients clipped at global norm 1."""
    o = c.optim
    o.schedule = "warmup_cosine"
    o.warmup_steps = 40
    o.final_lr_fraction = 0.05
    o.lr_recon = o.lr_seg = 1e-3
    o.ema_decay = 0.99
    o.clip = 1.0
