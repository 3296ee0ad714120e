//! Integration tests of sluice-core against outside references, and property
//! tests of its parsers and verifiers.

mod chat;
mod dataset;
mod properties;
mod tokenizer;
