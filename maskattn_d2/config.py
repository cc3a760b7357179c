"""Config keys of maskattn_d2.

Every key has a one-line comment: meaning, units, allowed values. Keys that detectron2
already has (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``, ``IGNORE_VALUE``, ``LOSS_WEIGHT``, ``NORM``)
are reused rather than duplicated.
"""
from detectron2.config import CfgNode as CN

# INPUT.RESIZE_MODE values that are implemented.
RESIZE_MODES = ("stretch",)


def add_maskattn_config(cfg):
    """Add the maskattn_d2 keys (with their defaults) to a detectron2 config, in place."""
    # Meta-architecture in META_ARCH_REGISTRY: "MaskAttnUNet" (all four variants).
    cfg.MODEL.META_ARCHITECTURE = "MaskAttnUNet"
    # Backbone builder in BACKBONE_REGISTRY.
    cfg.MODEL.BACKBONE.NAME = "build_maskattn_unet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # UNet is trained from scratch: nothing frozen
    # Input normalisation. False: (pixel - MODEL.PIXEL_MEAN) / MODEL.PIXEL_STD, detectron2's.
    # True: every image (at the network size) minus the mean of all its values, divided by
    # their standard deviation (at least 1 grey level), so that a dim fluorescence image gets
    # the contrast of a bright one; PIXEL_MEAN / PIXEL_STD are then unused.
    cfg.MODEL.PER_IMAGE_NORMALIZATION = False

    # ---------------------------------------------------------------- UNet backbone
    cfg.MODEL.MASK_ATTN_UNET = CN()
    # Input channels of the image (3 for RGB).
    cfg.MODEL.MASK_ATTN_UNET.IN_CHANNELS = 3
    # Channels of each encoder stage, shallowest first; stage i has stride 2**i, so
    # len(CHANNELS) sets the depth (5 stages: strides 1, 2, 4, 8, 16).
    cfg.MODEL.MASK_ATTN_UNET.CHANNELS = [32, 64, 128, 256, 512]
    # Number of [conv3x3-norm-act] blocks per encoder and decoder stage (>= 1).
    cfg.MODEL.MASK_ATTN_UNET.CONVS_PER_STAGE = 2
    # Normalisation after each conv: "BN", "GN", "SyncBN", "NaiveSyncBN" or "" (none).
    cfg.MODEL.MASK_ATTN_UNET.NORM = "BN"
    # Activation after each norm: "relu", "gelu" or "silu".
    cfg.MODEL.MASK_ATTN_UNET.ACTIVATION = "relu"
    # Backbone outputs returned by forward(): "dec1" is the stride-1 decoder output
    # (fused across scales when HYBRID_ATTN.MULTISCALE_FUSION); "decS"/"encS" for stride S.
    cfg.MODEL.MASK_ATTN_UNET.OUT_FEATURES = ["dec1"]

    # ---------------------------------------------------------- Mask attention module
    cfg.MODEL.MASK_ATTN = CN()
    # Strides of the encoder stages followed by a mask attention module (subset of the
    # stage strides; [] disables MAM in the encoder).
    cfg.MODEL.MASK_ATTN.ENCODER_SCALES = [4, 8, 16]
    # Strides of the decoder stages followed by a mask attention module ([] disables).
    cfg.MODEL.MASK_ATTN.DECODER_SCALES = [4, 8]
    # Attention heads per module (must divide the stage's channels).
    cfg.MODEL.MASK_ATTN.NUM_HEADS = 4
    # Kind of additive attention mask: "gate" (soft learned key gate, log sigmoid),
    # "hard" (keys with gate < 0.5 get -inf), "bias" (learned bias table over a fixed
    # token grid) or "none" (plain multi-head self-attention, the ablation).
    cfg.MODEL.MASK_ATTN.MASK_KIND = "gate"
    # Most key/value tokens per module; above it keys/values are average-pooled
    # (spatial-reduction attention) so memory is linear in pixels.
    cfg.MODEL.MASK_ATTN.MAX_TOKENS = 256
    # Hidden width of the module's feed-forward network, as a multiple of channels.
    cfg.MODEL.MASK_ATTN.FFN_RATIO = 2.0
    # Dropout probability on attention output and FFN (0 disables).
    cfg.MODEL.MASK_ATTN.DROPOUT = 0.0
    # Weight of the BCE loss supervising the gates with the "thing" mask (0 disables;
    # only meaningful for MASK_KIND "gate" or "hard").
    cfg.MODEL.MASK_ATTN.GATE_LOSS_WEIGHT = 0.0

    # -------------------------------------------------- Hybrid attention (paper 2)
    cfg.MODEL.HYBRID_ATTN = CN()
    # Channel + spatial attention (CBAM style) on every skip connection.
    cfg.MODEL.HYBRID_ATTN.SKIP_ATTENTION = False
    # Fuse all decoder outputs (upsampled to stride 1, concatenated, 1x1 conv) into "dec1".
    cfg.MODEL.HYBRID_ATTN.MULTISCALE_FUSION = False
    # Channel-attention bottleneck reduction ratio (hidden = max(C // ratio, 8)).
    cfg.MODEL.HYBRID_ATTN.CHANNEL_REDUCTION = 16
    # Kernel size of the spatial-attention conv (odd).
    cfg.MODEL.HYBRID_ATTN.SPATIAL_KERNEL = 7

    # ---------------------------------------------------------------- semantic head
    # NUM_CLASSES (stuff + thing classes, contiguous ids), IGNORE_VALUE and
    # LOSS_WEIGHT are detectron2's own keys.
    cfg.MODEL.SEM_SEG_HEAD.NAME = "MaskAttnSemSegHead"
    # The one backbone feature the head reads, as a one-element list (detectron2's key is a
    # list; any other length is an error).
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["dec1"]
    # Channels of the head's hidden 3x3 conv.
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 64
    # Normalisation in the head (same choices as MASK_ATTN_UNET.NORM).
    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    # alpha of L_sem = alpha * CE + (1 - alpha) * Dice; 1.0 is CE only (paper 1),
    # paper 2 uses a CE+Dice mix.
    cfg.MODEL.SEM_SEG_HEAD.CE_WEIGHT = 1.0
    # Hard-pixel mining: fraction of the highest-loss valid pixels kept in the CE
    # term, in (0, 1]; 1.0 disables mining.
    cfg.MODEL.SEM_SEG_HEAD.TOP_K_PERCENT_PIXELS = 1.0

    # ------------------------------------------------------ pixel-embedding head
    cfg.MODEL.EMBED_HEAD = CN()
    # Head in EMBED_HEAD_REGISTRY that predicts the pixel embeddings.
    cfg.MODEL.EMBED_HEAD.NAME = "MaskAttnEmbedHead"
    # The backbone features the head reads (each must be in MASK_ATTN_UNET.OUT_FEATURES). The
    # first sets the output resolution and has the smallest stride; coarser ones (e.g. "dec2")
    # are resized to it (bilinear) and concatenated: they see more of the image, which the
    # seed map of large or crowded objects needs.
    cfg.MODEL.EMBED_HEAD.IN_FEATURES = ["dec1"]
    # Channels of the head's hidden 3x3 convs.
    cfg.MODEL.EMBED_HEAD.CONVS_DIM = 64
    # Number of hidden 3x3 conv-norm-ReLU layers the embeddings, offsets and seed map share
    # (>= 1). A second one gives the instance outputs context and weights of their own beside
    # the semantic head that reads the same feature.
    cfg.MODEL.EMBED_HEAD.NUM_CONVS = 1
    # Normalisation in the head (same choices as MASK_ATTN_UNET.NORM).
    cfg.MODEL.EMBED_HEAD.NORM = "BN"
    # Append normalised (y, x) pixel coordinates to the head's input (CoordConv), so that
    # identical objects at different places can get different embeddings.
    cfg.MODEL.EMBED_HEAD.COORD_CONV = True
    # Dimension D of the L2-normalised pixel embeddings.
    cfg.MODEL.EMBED_HEAD.EMBED_DIM = 16
    # lambda: weight of the instance contrastive loss (0 disables it).
    cfg.MODEL.EMBED_HEAD.LOSS_WEIGHT = 1.0
    # tau: temperature of the contrastive loss (> 0).
    cfg.MODEL.EMBED_HEAD.TEMPERATURE = 0.1
    # Pixels sampled per ground-truth instance (balanced sampling, so small objects count).
    cfg.MODEL.EMBED_HEAD.SAMPLES_PER_INSTANCE = 32
    # Cap on sampled pixels per image (memory: the loss builds a samples x samples matrix).
    cfg.MODEL.EMBED_HEAD.MAX_SAMPLES_PER_IMAGE = 512
    # Spatial embeddings: the head also predicts each pixel's offset to its instance's centre
    # (pixels) and a seed map (high at centres), used by INSTANCE_METHOD "spatial_embedding".
    cfg.MODEL.EMBED_HEAD.SPATIAL_ON = True
    # Weight of the offsets' loss (OFFSET_LOSS).
    cfg.MODEL.EMBED_HEAD.OFFSET_LOSS_WEIGHT = 1.0
    # Loss of the offsets: "l1" (L1 distance to the offset to the instance's centroid, as
    # Panoptic-DeepLab) or "lovasz" (Neven et al. 2019: the head also predicts a clustering
    # bandwidth, "log_bandwidth"; each instance's pixels whose position + offset lies within
    # its bandwidth of its centroid form its cluster, and the Lovasz hinge of that cluster
    # against the instance's mask is the loss, with a smoothness term on the bandwidth).
    cfg.MODEL.EMBED_HEAD.OFFSET_LOSS = "l1"
    # Weight of the seed map's loss (SEED_LOSS; 0 on background, a bump per instance).
    cfg.MODEL.EMBED_HEAD.SEED_LOSS_WEIGHT = 1.0
    # Seed target on an instance: "depth" (distance to the instance's rim, normalised to 1 at
    # its deepest pixel: local, low where instances touch) or "gaussian" (of the distance to
    # the centroid, with SEED_SIGMA_SCALE).
    cfg.MODEL.EMBED_HEAD.SEED_TARGET = "depth"
    # "gaussian": width of the Gaussian relative to the instance's equivalent radius
    # sqrt(area / pi) (> 0; at least one pixel); 0.5 puts exp(-2) = 0.14 at its rim.
    cfg.MODEL.EMBED_HEAD.SEED_SIGMA_SCALE = 0.5
    # Loss of the seed map: "bce" (binary cross-entropy against SEED_TARGET, averaged over
    # instance pixels and over background pixels) or "focal" (CenterNet's penalty-reduced
    # focal loss: each instance's peak pixels of SEED_TARGET are positives, the other pixels
    # negatives weighted down by (1 - target)^4 near the peak, normalised by the number of
    # peak pixels so that every instance counts alike; the seed logits then start at
    # sigmoid^-1(0.1), its prior).
    cfg.MODEL.EMBED_HEAD.SEED_LOSS = "bce"

    # ------------------------------------------------------------ postprocessing
    cfg.MODEL.MASK_ATTN_POSTPROCESS = CN()
    # How thing pixels become instances: "spatial_embedding" (seeds of the seed map; every
    # pixel joins the seed nearest to where its offset points, inside its semantic connected
    # component; needs EMBED_HEAD.SPATIAL_ON), "embedding" (cluster the learned pixel
    # embeddings by cosine similarity) or "connected_components" (the paper's official
    # inference: connected components of the semantic map, per thing class).
    cfg.MODEL.MASK_ATTN_POSTPROCESS.INSTANCE_METHOD = "spatial_embedding"
    # "embedding": cosine similarity to a cluster's centre (the refined mean of its seed's
    # neighbours) above which a pixel joins the cluster, in (-1, 1); closer seeds are merged.
    cfg.MODEL.MASK_ATTN_POSTPROCESS.SIMILARITY_THRESHOLD = 0.9
    # "spatial_embedding": least seed-map value of a seed (a local maximum), in [0, 1).
    cfg.MODEL.MASK_ATTN_POSTPROCESS.SEED_THRESHOLD = 0.4
    # "spatial_embedding": a seed whose offset-pointed centre lies closer than this many
    # pixels (network resolution) to a stronger seed's is dropped (>= 0): one seed per centre.
    cfg.MODEL.MASK_ATTN_POSTPROCESS.SEED_MIN_DISTANCE = 3.0
    # "spatial_embedding": weight, in squared pixels, of the learned embeddings' cosine
    # distance (1 - cos) added to the squared distance between offset-pointed centres when a
    # pixel picks its seed (>= 0; 0 uses the spatial embedding alone).
    cfg.MODEL.MASK_ATTN_POSTPROCESS.EMBEDDING_WEIGHT = 0.0
    # "spatial_embedding": a pixel joins only the seeds of its own connected component of the
    # semantic map (a component without seed is one instance); False lets it join any seed.
    cfg.MODEL.MASK_ATTN_POSTPROCESS.WITHIN_COMPONENTS = True
    # "spatial_embedding": two instances of one component whose pixels' offsets point at
    # places closer than MERGE_RATIO x the larger equivalent radius sqrt(area / pi) are one
    # object split by a second seed, and are merged (>= 0; 0 disables; touching objects point
    # about the sum of their radii apart).
    cfg.MODEL.MASK_ATTN_POSTPROCESS.MERGE_RATIO = 1.0
    # "spatial_embedding": how a pixel picks its seed. "offsets": the seed nearest to where
    # its offset points. "seed_ascent": the seed it reaches by climbing the seed map (to the
    # highest neighbour, step by step, inside its component: a watershed), which follows the
    # dip of the seed map where objects touch; pixels that reach no seed fall back to their
    # offsets. "bandwidth" (needs EMBED_HEAD.OFFSET_LOSS "lovasz"): Neven et al.'s clustering,
    # each seed's cluster the pixels whose offset points within its learned bandwidth of it,
    # in two rounds (the second seeds what the first left unclaimed).
    cfg.MODEL.MASK_ATTN_POSTPROCESS.SEED_ASSIGNMENT = "offsets"
    # "seed_ascent": two seeds whose basins meet less than this below the lower seed value (a
    # ridge, not a valley) are one instance (>= 0; 0 never joins).
    cfg.MODEL.MASK_ATTN_POSTPROCESS.SADDLE_DEPTH = 0.02
    # Resizing the panoptic map to the image size: True puts thing boundaries where the
    # bilinearly upsampled thing probability crosses 0.5 (smooth outlines of small objects);
    # False resizes by nearest neighbour (blocks of network pixels).
    cfg.MODEL.MASK_ATTN_POSTPROCESS.UPSAMPLE_THING_BOUNDARIES = True
    # Connectivity of the thing mask's connected components, the instances of
    # "connected_components" and the regions "spatial_embedding" groups within: 8 (diagonal
    # neighbours connect; OpenCV's and scikit-image's default) or 4 (objects that meet only
    # at a corner stay apart).
    cfg.MODEL.MASK_ATTN_POSTPROCESS.CONNECTIVITY = 8
    # Instances smaller than this many pixels (at network resolution) are dropped.
    cfg.MODEL.MASK_ATTN_POSTPROCESS.MIN_INSTANCE_AREA = 8
    # Most instances kept per image (highest scores first).
    cfg.MODEL.MASK_ATTN_POSTPROCESS.MAX_INSTANCES = 100
    # Stuff segments smaller than this many pixels (at network resolution) become void.
    cfg.MODEL.MASK_ATTN_POSTPROCESS.STUFF_AREA = 16
    # Instances with a score below this are dropped from "instances" and "panoptic_seg" (their
    # pixels become void). A score is the mean class probability over the instance's pixels,
    # times its seed value ("spatial_embedding") or its cluster confidence ("embedding").
    cfg.MODEL.MASK_ATTN_POSTPROCESS.SCORE_THRESHOLD = 0.0
    # Segment id in "panoptic_seg" = class * LABEL_DIVISOR + instance index (from 1; 1 for a
    # stuff segment); must exceed MAX_INSTANCES.
    cfg.MODEL.MASK_ATTN_POSTPROCESS.LABEL_DIVISOR = 1000
    # Which outputs inference returns (detectron2 standard keys).
    cfg.MODEL.MASK_ATTN_POSTPROCESS.SEMANTIC_ON = True  # "sem_seg": per-class scores
    cfg.MODEL.MASK_ATTN_POSTPROCESS.INSTANCE_ON = True  # "instances": masks, boxes, scores
    cfg.MODEL.MASK_ATTN_POSTPROCESS.PANOPTIC_ON = True  # "panoptic_seg": (ids, segments_info)

    # -------------------------------------------------------------------- input
    # Network input size (height, width) in pixels; every image is resized to it.
    cfg.INPUT.NETWORK_SIZE = (128, 128)
    # Aspect handling when resizing to NETWORK_SIZE: only "stretch" (a plain resize that does
    # not keep the aspect, as the paper) is implemented; other values are rejected.
    cfg.INPUT.RESIZE_MODE = "stretch"
    # PIL filter of the resize to NETWORK_SIZE, in training (the random resized crop) and at
    # evaluation alike: "bilinear", "bicubic" or "lanczos". PIL widens the filter by the
    # downscaling factor, so each antialiases; Lanczos keeps more of the detail (the thin dark
    # gaps between touching nuclei of a 1000-pixel image shrunk to 128).
    cfg.INPUT.RESIZE_INTERPOLATION = "bilinear"
    # Random resized crop in training: range of the crop's area fraction of the image.
    cfg.INPUT.RANDOM_CROP_SCALE = (0.5, 1.0)
    # Probability of a horizontal flip in training.
    cfg.INPUT.FLIP_PROB = 0.5
    # Training also flips vertically and transposes, each with probability 1/2: with the
    # horizontal flip, each of the square's 8 symmetries (rotations by 90 degrees and their
    # mirror images) is equally likely. For data without an up or a handedness (microscopy);
    # needs a square NETWORK_SIZE.
    cfg.INPUT.SQUARE_SYMMETRIES = False
    # Colour jitter in training: max relative change of brightness/contrast/saturation (0 off).
    cfg.INPUT.COLOR_JITTER = 0.2
    # Instances covering fewer pixels than this at network size are ignored by the instance
    # losses (contrastive, offsets and seeds).
    cfg.INPUT.MIN_INSTANCE_PIXELS = 4
    # Name of the train dataset mapper: "MaskAttnPanopticMapper".
    cfg.INPUT.DATASET_MAPPER_NAME = "MaskAttnPanopticMapper"

    # ----------------------------------------------------------------- datasets
    # Train from the low-resolution copies of DATASETS.TRAIN (registered as
    # "<name>_lowres<N>", written by datasets/prepare_lowres_copy.py) whose images have short
    # side N pixels; 0 trains from the original files. Evaluation always reads the originals.
    cfg.DATASETS.TRAIN_LOWRES_SHORT_SIDE = 0

    # ------------------------------------------------------------------- solver
    # Optimizer: "ADAMW" (both papers) or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # LR schedule: detectron2's "WarmupCosineLR" by default.
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    # Peak learning rate, reached after SOLVER.WARMUP_ITERS.
    cfg.SOLVER.BASE_LR = 5e-4
    # Weight decay of the optimizer (norm layers get SOLVER.WEIGHT_DECAY_NORM instead).
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    # Automatic mixed precision: used on GPU only, ignored on CPU.
    cfg.SOLVER.AMP.ENABLED = True

    # ------------------------------------------------------------------ logging
    # Period, in iterations, of the console / metrics.json / TensorBoard writers
    # (detectron2's DefaultTrainer hard-codes 20; 1 logs every iteration's losses).
    cfg.LOG_PERIOD = 20

    # --------------------------------------------------------------- evaluation
    # Also report the paper's protocol: PQ computed at NETWORK_SIZE (ground truth
    # downsampled with nearest), labelled "paper protocol" beside the standard numbers.
    cfg.TEST.PAPER_PROTOCOL = False
    # Evaluators to run on panoptic datasets: subset of "panoptic", "instance", "semantic" and
    # "matching_ap" (opt-in: the DSB 2018 competition metric, mean over IoU thresholds
    # 0.5:0.05:0.95 of TP / (TP + FP + FN) per image, from the panoptic predictions).
    cfg.TEST.EVALUATORS = ["panoptic", "instance", "semantic"]
    # Flip test-time augmentation (maskattn_d2.modeling.test_time_flips), in every inference of
    # the PyTorch model (evaluation, demo, tools), not in the exported network: with
    # TEST.AUG.ENABLED (detectron2's key), the network also sees the image flipped
    # horizontally (TEST.AUG.FLIP, detectron2's key, default True) and / or vertically
    # (TEST.AUG.VERTICAL_FLIP; with both, also flipped both ways) and its outputs are averaged:
    # 2 or 4 times the network's cost. TEST.AUG.MIN_SIZES / MAX_SIZE are not used (the network
    # size is fixed).
    cfg.TEST.AUG.VERTICAL_FLIP = False


def check_resize_mode(cfg) -> None:
    """Reject an INPUT.RESIZE_MODE that is not implemented, naming the key."""
    if cfg.INPUT.RESIZE_MODE not in RESIZE_MODES:
        raise ValueError(
            f"INPUT.RESIZE_MODE {cfg.INPUT.RESIZE_MODE!r} is not implemented; the only mode is "
            "'stretch' (every image is resized to INPUT.NETWORK_SIZE, aspect not kept)."
        )
