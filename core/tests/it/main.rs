//! Integration tests of sluice-core against outside references.

mod hf_parity;
mod tokenizer;
