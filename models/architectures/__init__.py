"""segmill.models.architectures: the networks, one file per family, each builder registered by name.

`base` holds the backbone + head shape and `backbones` the shared encoders and the one place backbone weights
are loaded; every other module is a family (`fcn`, `deeplabv3`, `unet`, `segnet`, `deconvnet`, `mobilenetv3`)
whose builders register themselves with `segmill.models.registry` when imported.
"""
