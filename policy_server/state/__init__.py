"""The versioned merge state: the store (``store``), its manifest (``format``) and entry encoding
(``entry_codec``), committing admissions (``admission``) and one-shot merges (``oneshot``), and
exporting a skill (``export``)."""
