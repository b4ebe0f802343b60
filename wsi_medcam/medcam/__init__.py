"""Med-CAM: Classifier Activation Matching — the loss, training, baselines and evaluation."""
