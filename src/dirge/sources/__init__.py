"""Where images come from: OCI image layouts (``layout``); registries and buildah come later."""
