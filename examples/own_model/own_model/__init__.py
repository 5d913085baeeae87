"""An example of a user's own model and data for ssam-tune: a small MLP-Mixer (LayerNorm, no
BatchNorm) and a generated image data set of stripe patterns. See examples/own_model/README.md."""
