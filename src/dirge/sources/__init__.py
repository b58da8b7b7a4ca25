"""Where images come from: OCI image layouts (``layout``), registries (``registry``, ``auth``,
``partial``) and buildah storage (``buildah``)."""
