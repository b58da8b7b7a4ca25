"""Where images come from: the choice by reference (``open``), OCI image layouts (``layout``),
registries (``registry``, ``auth``, ``partial``) and buildah storage (``buildah``)."""
