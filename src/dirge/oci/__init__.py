"""The OCI image format and its verification: references (``reference``), media types and documents
(``image``), index → manifest → config (``resolve``) and verified, decompressed blob streams
(``blob``). No source, store, applier or session: everything else builds on this."""
