"""The names of the losses' variants, without torch: the config classes (and so ``--help``) read them."""

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "ipo_normalized", "sigmoid_norm", "apo_zero", "apo_down")
# the DPO losses that compare per-token (length-averaged) log-ratios: they need each response's length
LENGTH_NORMALISED_DPO_LOSS_TYPES = ("ipo_normalized", "sigmoid_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
GROUP_ADVANTAGE_TYPES = ("grpo", "dr_grpo", "rloo")
KTO_WEIGHT_BALANCE = ("warn", "auto", "refuse")  # what KTO does when its weights break the paper's ratio rule
REINFORCE_PP_TYPES = ("reinforce_pp", "reinforce_pp_baseline")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
