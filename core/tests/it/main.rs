//! Integration tests of sluice-core against outside references.

mod chat;
mod dataset;
mod tokenizer;
