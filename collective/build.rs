// Shared with every binary crate that links libtorch.
include!("../build/link_libtorch.rs");
