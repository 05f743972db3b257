"""The names of the losses' variants, without torch: the config classes (and so ``--help``) read them."""

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
KL_ESTIMATORS = ("k1", "k2", "k3")
GROUP_ADVANTAGE_TYPES = ("grpo", "dr_grpo", "rloo")
