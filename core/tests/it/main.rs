//! Integration tests of sluice-core against outside references.

mod tokenizer;
