"""The store, and only that: the cache's layout, blobs, ref records and bases (``cache``), the records
of published bases (``records``) and the locks and leases that guard them (``lock``). It imports the
OCI format (``oci/``) and nothing of the pipeline, the sources, the sessions or ``vm/``."""
