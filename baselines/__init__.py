"""What is truly each baseline's own (MixGRPO window, TreeGRPO tree advantages, GARDO weighting/gate/reset); the rest is tmpo core."""
