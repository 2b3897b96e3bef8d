"""Training: the click-simulating engines, the click rounds, the losses, the trainable-parameter policy and the
weight average."""
