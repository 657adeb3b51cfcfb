"""Default hyper-parameters: the paper's multi-level ResNet-50-i on CIFAR-10.

Paper Sec. 5.2: 160 epochs, interpolation at epochs 60 and 110 (three cycles,
2-2-2 -> 4-4-4 -> 8-8-8, h 1 -> 0.5 -> 0.25), cosine learning rate from 0.5 to
0.001 restarted every cycle (Eq. 9), SGD with momentum 0.9 and weight decay
2e-4, mini-batch 100 (CIFAR) or 32 (STL-10). Model variants override the
model fields; every field can be overridden on the command line:

    python -m mlres_jax.main --config=configs/default.py --workdir=/tmp/run \
            --config.dataset=cifar100
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # --- Data (paper App. A) -------------------------------------------------
    # One of 'cifar10', 'cifar100', 'stl10' (tensorflow-datasets, ArrayRecord
    # format) or 'fashion_mnist' (the Debian package's IDX files).
    config.dataset = "cifar10"
    # tensorflow-datasets data folder; '' means tfds's default
    # (~/tensorflow_datasets or $TFDS_DATA_DIR).
    config.data_dir = ""
    # Folder with Fashion-MNIST's four IDX .gz files.
    config.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"
    # Zero padding (pixels) for the random crop; -1 derives it from the data
    # set (CIFAR 4, STL-10 12, Fashion-MNIST 2); 0 disables the crop.
    config.crop_padding = -1

    # --- Model (paper Sec. 5.1, App. A, Table 5) -----------------------------
    # Filters of the first stage: 16 for ResNet, 32 for Wide ResNet.
    config.width = 16
    # Blocks per stage of the first cycle's model.
    config.stage_sizes = (2, 2, 2)
    # Explicit step size h of the first cycle's model (paper Eq. 2, App. C).
    config.step_size = 1.0

    # --- Multi-level method (paper Sec. 4.1, App. B) ------------------------
    # True: interpolate at every cycle boundary (stage sizes x2, h / 2).
    # False: fixed depth with the same learning-rate restarts (the paper's
    # first-cycle and last-cycle baselines).
    config.multilevel = True
    # Growth rule, a key of mlres_jax.multilevel.GROWTH_RULES: 'paper' (Sec.
    # 4.1), 'identity', 'transition_keeping', 'linear' or 'appended'.
    config.interpolation_rule = "paper"
    # What happens to the SGD momentum at an interpolation:
    # 'interpolate' (carried through the rule, as the parameters), 'reset'
    # (zeroed) or 'zero_inserted' (zero for the inserted blocks only).
    config.momentum_at_interpolation = "interpolate"
    # Training images (the first N, eval mode) evaluated just before and
    # just after every growth, beside the test split, to measure the jump in
    # loss and error the growth causes; 0 measures the test split only.
    config.growth_train_examples = 2000
    # Start from the latest checkpoint in this folder (e.g. the output of
    # `python -m mlres_jax.grow`) instead of a random initialisation: its
    # parameters and batch-norm statistics, its stage sizes and step size h
    # (which replace stage_sizes and step_size); a fresh optimizer. Its data
    # set and width must be this run's. '' starts from scratch.
    config.init_from = ""

    # --- Schedule and optimiser (paper Sec. 5.2, Eq. 9) ----------------------
    # Length of the run in epochs (fractions allowed).
    config.num_epochs = 160.0
    # Epochs at which a new cycle starts (interpolation and/or LR restart).
    config.cycle_boundaries = (60.0, 110.0)
    config.learning_rate_max = 0.5  # eta_max
    config.learning_rate_min = 0.001  # eta_min
    config.momentum = 0.9
    config.weight_decay = 2e-4
    # Mini-batch size; -1 derives it from the data set (100, STL-10: 32).
    config.batch_size = -1
    # Evaluation batch size (the last batch is padded and masked, so every
    # test example counts); one larger than the test split is fitted to it.
    config.eval_batch_size = 500

    # --- Speed ------------------------------------------------------------------
    # Run the blocks after the first of each stage as one jax.lax.scan over
    # stacked parameters: compile time flat in depth, the same maths.
    config.scan_blocks = False
    # Computation dtype: 'float32', or 'bfloat16' (parameters, batch-norm
    # statistics and optimizer state stay float32; for accelerators).
    config.compute_dtype = "float32"
    # Compile the next depth's steps in a background thread while the
    # current cycle trains, so a growth does not wait for the compiler
    # (docs/paper-scale.md). A stop (Ctrl-C) during a cycle waits for a
    # compilation in flight to finish; set False to stop at once.
    config.compile_ahead = True

    # --- Devices ----------------------------------------------------------------
    # Devices of the data-parallel mesh: -1 uses every device of every process
    # (a multi-process run needs all). The global batch_size and
    # eval_batch_size are split evenly over them, so they must be multiples
    # of this number. Batch-norm statistics are over the global batch, so the
    # maths does not depend on it, and a checkpoint resumes on any number.
    config.num_devices = -1

    # --- Bookkeeping ----------------------------------------------------------
    config.seed = 0
    # Evaluate on the whole test split every this many epochs and at the end
    # of every cycle.
    config.eval_every_epochs = 1.0
    # Write training metrics (loss, accuracy, learning rate) every this many
    # steps.
    config.log_every_steps = 100
    # Save a checkpoint every this many steps, and at the end of every cycle.
    config.checkpoint_every_steps = 1000
    # Number of most recent checkpoints kept in <workdir>/checkpoints.
    config.checkpoints_to_keep = 3
    # Show a progress bar on stderr.
    config.progress_bar = True

    return config


def paper_model(
    width: int, stage_sizes: tuple[int, int, int], multilevel: bool, scan_blocks: bool = False
) -> ml_collections.ConfigDict:
    """The defaults with one model of the paper's Tables 3-4.

    Args:
      width: channels of the first stage (16 for ResNet, 32 for WResNet).
      stage_sizes: blocks per stage; of the first cycle if ``multilevel``.
      multilevel: True for the multi-level models (the names ending in -i):
        the blocks double at epochs 60 and 110; False for a fixed depth.
      scan_blocks: True for the 122-layer models (20 blocks per stage in their
        last cycle): compile time flat in depth (why, and the measurement behind
        this default: docs/paper-scale.md); --config.scan_blocks=False for the
        unrolled layout.
    """
    config = get_config()
    config.width = width
    config.stage_sizes = stage_sizes
    config.multilevel = multilevel
    config.scan_blocks = scan_blocks
    return config
