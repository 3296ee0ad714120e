// Link a sluice binary (and the crate's test and bench binaries, which the GPU
// checks carry) so it runs without LD_LIBRARY_PATH and keeps CUDA.
//
// * rpath to libtorch's lib dir (reported by torch-sys as DEP_TCH_LIBTORCH_LIB);
// * `--no-as-needed -ltorch_cuda`: otherwise the linker drops libtorch_cuda.so
//   (nothing references it directly) and CUDA is never available at run time.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
